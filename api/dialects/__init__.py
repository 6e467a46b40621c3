"""One folder per client dialect: its protocol models, its renderers (answers, streams, errors), its routes.
Each is an adapter over the one pipeline (api/prepare.py, api/admission.py, api/respond.py)."""
