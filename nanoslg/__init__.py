"""nanoslg: a small, fast LLM inference engine and OpenAI-compatible server."""
from nanoslg.sampling_params import SamplingParams

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "RequestOutput", "__version__"]


def __getattr__(name):
    # The engine pulls in torch-free but heavy modules (zmq, launcher); import them only when asked for.
    if name in ("LLM", "RequestOutput"):
        from nanoslg import llm

        return getattr(llm, name)
    raise AttributeError(name)
