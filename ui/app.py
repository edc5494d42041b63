"""spindle UI: ``streamlit run ui/app.py`` (the launcher does this on UI_PORT).

Three pages (``ui/views/``): Chat, Models, System. Configuration comes from the environment
(``protocol.settings.UISettings``: GATEWAY_URL, MANAGER_URL, API_KEY, ADMIN_API_KEY); the UI talks
only to the gateway and model-manager REST APIs, through ``ui/client.py``.
"""

from __future__ import annotations

import streamlit as st

from ui.common import clients

st.set_page_config(page_title="spindle", page_icon=":material/cyclone:", layout="wide")
# A failure we did not foresee shows a short message, never a stack trace (the server log has it).
st.set_option("client.showErrorDetails", "none")
st.set_option("client.toolbarMode", "minimal")

page = st.navigation([
    st.Page("views/chat.py", title="Chat", icon=":material/chat:", url_path="chat", default=True),
    st.Page("views/models.py", title="Models", icon=":material/deployed_code:", url_path="models"),
    st.Page("views/system.py", title="System", icon=":material/monitoring:", url_path="system"),
])

settings = clients().settings
with st.sidebar:
    st.caption(f"**Gateway** {settings.gateway_url}  \n**Model-manager** {settings.manager_url}")

page.run()
