"""Usage per key: GET /v1/usage (store/usage.py counts it)."""
from __future__ import annotations

from ..http import auth, metering
from ..http.errors import APIError, invalid
from ..http.extensions import Blueprint
from ..schemas.usage import GROUPS, UsageListSchema, UsageQuerySchema

blp = Blueprint("usage", __name__, url_prefix="/v1", description="Who used what.")


@blp.route("/usage", methods=["GET"])
@blp.arguments(UsageQuerySchema, location="query")
@blp.response(200, UsageListSchema)
@blp.errors(400, 503)
def get_usage(args):
    """Usage by key, model, endpoint and hour

    Requests, prompt, cached and completion tokens and errors of every request
    that reached a model. An admin key (or a keyless server) sees every key and
    may filter by `key`; any other key sees its own usage only.
    """
    store = metering.usage_store()
    if store is None:
        raise APIError(503, "Usage is not being counted on this server (LLMHOST_USAGE=0, or its "
                            "store could not be opened: see the server's log).",
                       code="usage_unavailable")
    group_by = tuple(g.strip() for g in args["group_by"].split(",") if g.strip())
    for group in group_by:
        if group not in GROUPS:
            raise invalid(f"Invalid group_by value {group!r}: use any of {', '.join(GROUPS)}.",
                          param="group_by")
    owner, sees_all = auth.caller()
    name = args.get("key")
    if not sees_all:
        if name is not None and name != auth.identity().name:
            raise APIError(403, "Only an admin key can read another key's usage; leave out `key`.",
                           param="key", code="admin_key_required")
        name = None
    rows = store.report(key=None if sees_all else owner, key_name=name, model=args.get("model"),
                        endpoint=args.get("endpoint"), start=args.get("start_time"),
                        end=args.get("end_time"), group_by=group_by)
    data = []
    for row in rows:
        bucket = {"key": _label(row)} if "key" in group_by else {}
        for column in ("model", "endpoint"):
            if column in row:
                bucket[column] = row[column]
        start = row.get("day", row.get("hour"))
        if start is not None:
            bucket["start_time"] = int(start)
        counts = {f: row[f] for f in ("requests", "prompt_tokens", "cached_tokens",
                                      "completion_tokens", "errors")}
        counts["total_tokens"] = counts["prompt_tokens"] + counts["completion_tokens"]
        data.append({**bucket, **counts})
    return {"object": "list", "data": data}


def _label(row: dict) -> str:
    return auth.Identity(row["key"] or None, name=row.get("key_name")).label
