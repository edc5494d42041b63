"""model-manager: the artifact volume's REST API (FastAPI, port 8001) and its rq jobs.

``python -m model_manager`` serves the API; ``python -m model_manager.jobs_worker`` runs the pull /
import / optimize jobs. The API never does long work itself: downloads, extraction, copies and
optimizer passes run in the jobs worker, file I/O the API must do runs on threads.
"""
