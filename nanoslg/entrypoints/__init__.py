"""What users run: the `nanoslg` command (serve, generate, pull, chat, debug, bench). These modules use the engine
core in `nanoslg/`; nothing in the core imports them."""
