"""schemathesis (property-based API testing) against a live `nanoslg serve`: every operation of /openapi.json, all
checks, at least 800 generated cases. A failure here means the published schema and the server disagree (or
the server answered 5xx): fix the server or the schema, not the check.

This module is also the CLI's hooks module (SCHEMATHESIS_HOOKS=test_schemathesis): it registers the one argued
exception, as a check that wraps a built-in one.
"""
import glob
import json
import os
import subprocess
import sys

import pytest

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from server_utils import Server  # noqa: E402

KEY = "fuzz-key"  # with a key, the ignored_auth check has something to test
# fuzzing cases per operation: with the coverage phase, about 1100 cases in all (2 to 3 minutes alone on two cores;
# 250 took up to 8 minutes in the full suite for a few more cases)
MAX_EXAMPLES = 120


# The codes of the 400s a schema-valid body can get (nanoslg/errors.py): a prompt's length in tokens
TOKEN_COUNT_CODES = ("context_length_exceeded", "empty_prompt")
# ... and what only a grammar engine or another field can judge (structured.py)
UNSCHEMABLE_CODES = ("invalid_json_schema", "invalid_grammar", "unknown_tool")


@schemathesis.check
def positive_data_acceptance_but_token_count(ctx, response, case):
    """positive_data_acceptance, except a 400 about the prompt's length in tokens.

    A text prompt or a conversation can be longer than max_model_len in tokens while the schema allows it: a limit
    in tokens cannot be written in JSON Schema (a character is one to several tokens, and a conversation adds the
    chat template's), so the schema says it in prose and the server answers 400 with OpenAI's code
    context_length_exceeded, as OpenAI and vLLM do. Likewise a non-empty text can be zero tokens (SmolLM2's
    tokenizer drops six control bytes it has no token for, so "\x16" tokenizes to nothing): 400, code
    empty_prompt, as vLLM refuses an empty prompt. A max_tokens the body sets must fit beside the prompt in
    max_model_len, which relates two fields by the prompt's token count: 400, code context_length_exceeded, as
    OpenAI and vLLM answer.

    Likewise a JSON schema, regex or grammar in response_format, structured_outputs or a tool's parameters is
    schema-valid as any object or string, but xgrammar builds only real ones (a "type" of 5 is not a schema): 400
    with code invalid_json_schema or invalid_grammar, as OpenAI refuses an invalid schema. And a tool_choice naming
    a function must name one of the request's tools, which JSON Schema cannot relate: 400, code unknown_tool.
    Every other refusal of schema-valid data still fails.
    """
    if response.status_code == 400:
        try:
            if response.json()["error"]["code"] in TOKEN_COUNT_CODES + UNSCHEMABLE_CODES:
                return True
        except (ValueError, KeyError, TypeError):
            pass
    return positive_data_acceptance(ctx, response, case)


@pytest.mark.slow
def test_schemathesis_finds_no_disagreement(tiny_chat_model, tmp_path):
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    # Small limits keep each case cheap: 128 tokens of context leave room for most generated conversations after
    # SmolLM2's 30-token chat template, and bound the worst case (16 choices of each of a dozen prompts, run to the
    # end of the context) to well under a minute on two cores. The queue limits are raised so that a body of many
    # prompts times n runs instead of getting the overload 503.
    with Server(tiny_chat_model, "--max-model-len", "128", "--max-tokens-default", "16", "--served-model-name",
                "tiny", "--max-queued-requests", "100000", "--max-waiting-requests", "100000",
                api_key=KEY) as srv:
        cmd = [sys.executable, "-m", "schemathesis.cli", "--no-color", "run", f"{srv.url}/openapi.json",
               "--header", f"Authorization: Bearer {KEY}",
               "--checks", "all", "--exclude-checks", "positive_data_acceptance",  # replaced above
               # all checks include a response-time bound (10 s unless set): the worst case above, on a slow
               # or busy runner, must not count as a failure, while a stuck request still does
               "--max-response-time", "120", "--request-timeout", "180",
               "--max-examples", str(MAX_EXAMPLES), "--seed", "20261202", "--workers", "2",
               "--continue-on-failure", "--report", "json", "--report-dir", str(tmp_path)]
        env = {**os.environ, "SCHEMATHESIS_HOOKS": "test_schemathesis",
               "PYTHONPATH": os.pathsep.join(p for p in (tests_dir, os.environ.get("PYTHONPATH")) if p)}
        # cwd: the hypothesis example database goes to tmp_path, not the checkout
        run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1200)
    output = run.stdout + run.stderr
    reports = glob.glob(str(tmp_path / "*.json"))
    assert reports, output[-5000:]
    with open(reports[0]) as f:
        report = json.load(f)
    print(f"schemathesis: {report['test_cases']['generated']} cases in {report['running_time']:.0f} s")
    # every operation but GET /openapi.json, which schemathesis leaves out as the schema's own address
    assert report["operations"]["tested"] == report["operations"]["total"] >= 7, output[-5000:]
    assert not report["failures"] and not report["errors"], output[-20000:]
    assert report["test_cases"]["generated"] >= 800, output[-5000:]
    assert run.returncode == 0, output[-5000:]
