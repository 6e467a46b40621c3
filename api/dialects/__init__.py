"""One folder per client dialect: its protocol models, its renderers (answers, streams, errors), its routes.
Each is an adapter over the one pipeline (api/pipeline/prepare.py, api/pipeline/admission.py, api/pipeline/respond.py)."""
