"""Pinned config hashes: the results of a study are found again only under the same hash.

A stored results folder (``<out>/<experiment>/config.json``) and a shared tuning folder
(``<out>/lr_tuning/<hash[:12]>``) belong to one config hash; a field renamed, added, removed or
given another default changes it, and the next run no longer resumes from the stored results.
"""

from __future__ import annotations

import pytest

from experiments.suite import EXPERIMENTS, _tuning

ORPHANS = ("changing it orphans the stored study results (they are no longer found under the new "
           "hash); update the pinned value only deliberately, together with a note in the commit "
           "saying which results must be recomputed")

PINNED = {
    ("e1_kernel_similarity", "quick"): "57ee8533b4a37fcab77757f3aa8cd60deb7a783625d79f319010d9e07f664ccf",
    ("e1_kernel_similarity", "study"): "dcd1956e98d9762a2cfcb436a0df8940298174dc932b907d7776bd4a2a026feb",
    ("e2_premise", "quick"): "65e77c57d9de5eb6f69e5110814001cc81d4e47582120938d733cdd75a444be7",
    ("e2_premise", "study"): "5e802c1d62a41ef95e9b221fd4c8a91e72d6407696f94d120c35a0c0ebfb8102",
    ("e3_kernel_regime", "quick"): "436fc20298ddf1f5a569905b0f649b5ec39aad4f23037f2df974960e2d87f3e2",
    ("e3_kernel_regime", "study"): "ff8a0e95ff152b3d2fe266e8172b8a203d29772071c65bd33149bea684dc4b09",
    ("e4_degree_lr", "quick"): "c97ad7a83e6c2b5aa0dfa6d9d18e328402e47c35fca17cecd1178590389479f5",
    ("e4_degree_lr", "study"): "fa6837285e8d584c60b9fc41625f6ee3413574f1f3ba85303434c6b1e4da88f4",
    ("e5_accuracy_cost", "quick"): "06d4ce10b8787bb099370c5a533cdfca47a010b1944060145581f03ad454a0a6",
    ("e5_accuracy_cost", "study"): "cac56f45b120c57cd56a369ea4a6ed622b10b4d8ec1f82a83eff7dfe28f7c686",
    ("e6_kernel_prediction", "quick"): "ed8d4c82851d866bfc7b6b69a6024aa8d648e840368113741b98eb6e552f9c2b",
    ("e6_kernel_prediction", "study"): "824891d8a9974bad7dc4be5acffd1b0650d85ad8e0f128e66c5efd7ae075e445",
    ("e7_parameter_counts", "quick"): "c152a21826ec2f38719fd74d36aeafbfc3b4d31f8625999a691bed1d1d78988b",
    ("e7_parameter_counts", "study"): "c152a21826ec2f38719fd74d36aeafbfc3b4d31f8625999a691bed1d1d78988b",
    ("e8_memory", "quick"): "997eedf20f75cc71ddcfaefdcaa3bec1bee43572331e31533d5a1d096838e6e6",
    ("e8_memory", "study"): "f4ce0b9b0a47e6b78107b6ba502a0dc28336c61cb535fefac407f63a55dce965",
    ("e9_degree_accuracy", "quick"): "a1b2728d334a62f650b28312fe35d430264d3368a32a93563b3606f6a126e14c",
    ("e9_degree_accuracy", "study"): "dc5940196c42d5f23e196e6847d1075c619d790479856ef6ae30e8e27275ee13",
}

# The learning-rate tunings the study presets share (e3, e5 and e9 on Rotten Tomatoes; e5 on IMDB).
PINNED_TUNING = {
    ("e3_kernel_regime", None): "f4b714a8cdbdddd569352f5ce281c6aeeb22610ba5a71d02988c8066506509c4",
    ("e5_accuracy_cost", "rotten_tomatoes"):
        "f4b714a8cdbdddd569352f5ce281c6aeeb22610ba5a71d02988c8066506509c4",
    ("e5_accuracy_cost", "imdb"): "6a3129f108cf85d70789898297d11107f35070d6bfead21664eb070234a52a99",
    ("e9_degree_accuracy", None): "f4b714a8cdbdddd569352f5ce281c6aeeb22610ba5a71d02988c8066506509c4",
}


def test_every_experiment_has_pinned_quick_and_study_hashes():
    assert set(PINNED) == {(name, p) for name in EXPERIMENTS for p in ("quick", "study")}


@pytest.mark.parametrize(("name", "preset"), sorted(PINNED))
def test_preset_config_hash_is_pinned(name, preset):
    module = EXPERIMENTS[name]
    got = module.PRESETS[preset].config_hash(module.NAME)
    assert got == PINNED[name, preset], f"the config hash of {name} preset {preset} is now {got}; {ORPHANS}"


@pytest.mark.parametrize(("name", "dataset"), list(PINNED_TUNING))
def test_study_tuning_setup_hash_is_pinned(name, dataset):
    setup = _tuning.setup_from(EXPERIMENTS[name].PRESETS["study"], dataset=dataset)
    got = setup.config_hash(_tuning.TUNING_DIR)
    assert got == PINNED_TUNING[name, dataset], (
        f"the tuning setup hash of {name} (study, {dataset}) is now {got}; {ORPHANS}"
    )
