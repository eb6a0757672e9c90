"""No server paths in answers: the next sample names its download route (fix 14 of the package docstring).

Upstream: ``POST /activelearning/{strategy}`` (``monailabel/endpoints/activelearning.py``, 0.8.5) answers the
image's absolute path on the server twice over: ``MONAILabelApp.next_sample`` sets ``path`` and the endpoint
then merges the datastore's image info (which holds ``path`` too). 3D Slicer's client loads ``path`` only
when that file exists on its own machine and downloads the image otherwise; OHIF uses the id. Here ``path``
is the image's download route (``/datastore/image?image=<id>``), which every client can use.
"""

from __future__ import annotations

from urllib.parse import quote


def download_route(image_id: str) -> str:
    return f"/datastore/image?image={quote(image_id, safe='')}"


def install() -> None:
    import monailabel.endpoints.activelearning as activelearning

    upstream = getattr(activelearning.sample, "upstream", activelearning.sample)

    def sample(strategy, params=None, user=None):
        result = upstream(strategy, params, user)
        if isinstance(result, dict) and result.get("id"):
            result["path"] = download_route(result["id"])
        return result

    sample.upstream = upstream
    activelearning.sample = sample
