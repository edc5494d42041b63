"""spindle's web UI: a Streamlit app (``streamlit run ui/app.py``) over the gateway and model-manager APIs."""
