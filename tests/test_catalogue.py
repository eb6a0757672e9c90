"""The label catalogue: every structure of the public release, with codes, regions and colours."""

import json

import pytest

from mrannotator.catalogue import REGIONS, load_catalogue

RELEASE = {
    "Dataset001_Abdomen": ["spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "aorta",
                           "inferior vena cava", "pancreas"],
    "Dataset002_ShoulderKnee": ["femur", "patella", "fibula", "tibia", "humerus_right", "clavicle_right",
                                "scapula_right", "humerus_left", "clavicle_left", "scapula_left"],
    "Dataset003_PelvisProstate": ["upper_femora", "pelvis", "sacrum", "prostate"],
    "Dataset004_Spine": [f"Vertebrae {lv}" for lv in [f"C{i}" for i in range(3, 8)]
                         + [f"T{i}" for i in range(1, 13)] + [f"L{i}" for i in range(1, 6)]],
}


def test_every_release_label_and_the_papers_extra_classes_are_catalogued():
    cat = load_catalogue()
    names = [n for labels in RELEASE.values() for n in labels] + ["stomach", "esophagus"]
    assert len(names) == 46
    found = [cat.find(n) for n in names]
    assert all(found), [n for n, s in zip(names, found, strict=True) if s is None]
    assert len({s.id for s in found}) == 46  # one stable id each


def test_entries_are_complete_and_ids_fit_uint8():
    cat = load_catalogue()
    for s in cat:
        assert 0 < s.id < 256
        assert s.region in REGIONS
        assert s.type.scheme == "SCT" and s.type.code.isdigit() and s.type.meaning
        assert s.category.code == "123037004"
        assert len(s.color) == 3 and all(0 <= c <= 255 for c in s.color)
    assert {s.region for s in cat} == set(REGIONS)


def test_laterality_is_a_modifier_not_part_of_the_type():
    cat = load_catalogue()
    for base in ("kidney", "humerus", "clavicle", "scapula"):
        right, left = cat.get(f"{base}_right"), cat.get(f"{base}_left")
        assert right.type == left.type
        assert right.laterality.meaning == "Right" and left.laterality.meaning == "Left"
        assert right.id != left.id
    assert cat.get("liver").laterality is None


def test_model_names_match_the_demo_datasets(demo_weights):
    cat = load_catalogue()
    for ds, labels in RELEASE.items():
        dj = json.loads(next(demo_weights.glob(f"{ds}/*/dataset.json")).read_text())
        assert [k for k, v in sorted(dj["labels"].items(), key=lambda kv: kv[1]) if v] == labels
        assert all(cat.find(n) for n in labels)


def test_regions_and_aliases_are_catalogue_data():
    from mrannotator.catalogue import REGION_ALIASES, expand_regions, read_data_toml
    from mrannotator.errors import InputError

    data = read_data_toml("catalogue.toml")
    assert tuple(data["regions"]) == REGIONS
    assert expand_regions(["spine"]) == set(REGION_ALIASES["spine"]) == {"cervical_spine", "thoracic_spine",
                                                                         "lumbar_spine"}
    assert expand_regions(["Knee ", "lumbar"]) == {"knee", "lumbar_spine"}
    assert expand_regions(["all"]) is None and expand_regions(None) is None
    with pytest.raises(InputError, match="unknown region 'elbow'.*abdomen.*spine"):
        expand_regions(["elbow"])


# SNOMED CT codes written down from SNOMED CT itself (concept id, preferred term), not read from the catalogue:
# a wrong or renumbered code in catalogue.toml changes every SEG, SR and Slicer segment we write.
PINNED_SNOMED = {
    # paired structures: one type code, laterality as the modifier (24028007 Right, 7771000 Left)
    "kidney_right": ("64033007", "Kidney", "24028007", "Right"),
    "kidney_left": ("64033007", "Kidney", "7771000", "Left"),
    "humerus_right": ("85050009", "Humerus", "24028007", "Right"),
    "humerus_left": ("85050009", "Humerus", "7771000", "Left"),
    "clavicle_right": ("51299004", "Clavicle", "24028007", "Right"),
    "clavicle_left": ("51299004", "Clavicle", "7771000", "Left"),
    "scapula_right": ("79601000", "Scapula", "24028007", "Right"),
    "scapula_left": ("79601000", "Scapula", "7771000", "Left"),
    # unpaired
    "liver": ("10200004", "Liver", None, None),
    "spleen": ("78961009", "Spleen", None, None),
    "aorta": ("15825003", "Aorta", None, None),
    "prostate": ("41216001", "Prostate", None, None),
    "femur": ("71341001", "Femur", None, None),
}


@pytest.mark.parametrize("name", sorted(PINNED_SNOMED))
def test_snomed_codes_are_the_pinned_ones(name):
    code, meaning, lat_code, lat_meaning = PINNED_SNOMED[name]
    s = load_catalogue().get(name)
    assert (s.type.scheme, s.type.code, s.type.meaning) == ("SCT", code, meaning)
    assert (s.category.scheme, s.category.code) == ("SCT", "123037004")  # Anatomical Structure
    if lat_code is None:
        assert s.laterality is None
    else:
        assert (s.laterality.scheme, s.laterality.code, s.laterality.meaning) == ("SCT", lat_code, lat_meaning)
