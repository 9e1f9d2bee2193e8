"""Probes for load balancers and Kubernetes."""
from ..extensions import Blueprint

blp = Blueprint("health", __name__, description="Liveness and readiness probes.")


@blp.route("/health", methods=["GET"])
def health():
    """Liveness: 200 while the process serves"""
    return {"status": "ok"}
