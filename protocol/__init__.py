"""The one contract between spindle's services.

Everything two services must agree on lives here and only here: settings (``settings``), Redis key
names (``keys``), the versioned messages that cross Redis (``messages``), the artifact volume layout
and model manifest (``artifacts``) and the OpenAI error shape (``errors``). Services import this
package; they never import each other.
"""

PROTOCOL_VERSION = 1
