"""Placeholder page until the app lands: the engine is usable from the command line."""

from __future__ import annotations


def launch(host: str = "127.0.0.1", port: int = 7860, share: bool = False, auth: str = "", runs_dir: str = "") -> None:
    import gradio as gr

    with gr.Blocks(title="LoRA trainer") as demo:
        gr.Markdown(
            "# LoRA trainer\nThe app is on its way. Train from the command line: `python -m lora_gui train --help`."
        )
    credentials = tuple(auth.split(":", 1)) if auth else None
    demo.launch(server_name=host, server_port=port, share=share, auth=credentials)
