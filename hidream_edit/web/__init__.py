"""The web editor: `service` (what the buttons do, gradio-free) and `layout` (the gradio app and serving)."""
