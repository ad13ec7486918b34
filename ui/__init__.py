"""Radiologist review app (Gradio): worklist, viewer, findings review, sign-off, dashboard."""
