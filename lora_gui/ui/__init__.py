"""The Gradio app: one module per tab, no training logic here."""
