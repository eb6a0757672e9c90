"""``label_names`` of an infer result as 3D Slicer's MONAI Label module reads them: by position, not by value.

The module sorts ``label_names`` by id, drops ``background`` and calls
``ImportLabelmapToSegmentationNode(labelmap, segmentation, [name_0, name_1, ...])``, which gives segment
``name_i`` the voxels of value ``i + 1`` (Slicer's ``vtkSlicerSegmentationsModuleLogic``: ``label =
segmentIndex + 1``). Catalogue ids are not 1..N on merged results (abdomen 1-8, shoulder/knee 11-20, ...) nor
on one region model (knee: 11-14), so the names past the first gap landed in the wrong segments. Here every
id from 1 to the largest is named: a served structure by its name, a gap by a placeholder no segment has
(Slicer skips names with no segment), so position ``i`` is id ``i + 1`` again.
"""

from __future__ import annotations

GAP = "(id {} unused)"


def positional_label_names(names: dict[str, int]) -> dict[str, int]:
    """``{name: id}`` (``background`` 0 kept if given) with every missing id 1..max named by :data:`GAP`,
    in ascending id order."""
    by_id = {int(v): str(k) for k, v in names.items()}
    if len(by_id) != len(names):
        raise ValueError(f"two label names share one id: {names}")
    top = max(by_id, default=0)
    out = {by_id[0]: 0} if 0 in by_id else {}
    for i in range(1, top + 1):
        out[by_id.get(i, GAP.format(i))] = i
    return out
