"""Topology files: every file in cluster_configs/ loads; a bad file gives one clear line."""

from __future__ import annotations

import glob
import os

import pytest
import yaml

from kiln.launch.topology import TopologyError, load_topology

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "cluster_configs")
FILES = sorted(glob.glob(os.path.join(ROOT, "*.yaml")))


def test_all_shipped_files_are_present():
    names = {os.path.basename(f) for f in FILES}
    assert {"hgx-h100-8gpu.yaml", "hgx-h200-8gpu.yaml", "hgx-b200-8gpu.yaml", "2x-hgx-h100-tp8-pp2.yaml",
            "4-node-h200.yaml", "local-cpu.yaml"} <= names


@pytest.mark.parametrize("path", FILES, ids=os.path.basename)
def test_every_file_loads(path):
    t = load_topology(path)
    lay = t.layout
    assert lay.tp * lay.pp * lay.dp <= t.nodes * t.slots_per_node


def test_layouts_of_known_files():
    t = load_topology(os.path.join(ROOT, "2x-hgx-h100-tp8-pp2.yaml"))
    assert (t.nodes, t.layout.tp, t.layout.pp, t.interconnect.inter_node) == (2, 8, 2, "infiniband")
    t = load_topology("local-cpu.yaml")  # a bare name resolves inside cluster_configs/
    assert t.device == "cpu" and (t.layout.tp, t.layout.dp) == (2, 2)


BASE = {"name": "x", "nodes": 1, "gpus_per_node": 8, "gpu_type": "H100-SXM5-80GB"}


@pytest.mark.parametrize(
    "data, needle",
    [
        ({**BASE, "layout": {"tp": 8, "dp": 2}}, "exceeds the 8 GPUs"),
        ({**BASE, "gpus_per_node": 4, "nodes": 2, "interconnect": {"inter_node": "ethernet"}, "layout": {"tp": 8}},
         "does not fit on one node"),
        ({**BASE, "nodes": 2, "layout": {"tp": 8, "pp": 2}}, "inter_node"),
        ({**BASE, "layout": {"tp": 4, "ep": 3}}, "multiple of ep"),
        ({**BASE, "interconnect": {"intra_node": "wifi"}}, "interconnect.intra_node"),
        ({**BASE, "gpu_type": None}, "gpu_type is required"),
        ({**BASE, "colour": "blue"}, "unknown field 'colour'"),
        ({**BASE, "layout": {"tp": 0}}, "layout.tp"),
        ({**BASE, "gpus_per_node": 6, "nodes": 2, "interconnect": {"inter_node": "infiniband"}, "layout": {"tp": 4, "dp": 3}},
         "do not pack"),
        (["not", "a", "mapping"], "must be a mapping"),
    ],
)
def test_bad_files_give_one_line(tmp_path, data, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopologyError) as e:
        load_topology(str(path))
    msg = str(e.value)
    assert "\n" not in msg and needle in msg and str(path) in msg


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(TopologyError, match="does not exist"):
        load_topology(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(TopologyError, match="not valid YAML") as e:
        load_topology(str(bad))
    assert "\n" not in str(e.value)


def test_with_layout_revalidates():
    t = load_topology("local-cpu.yaml")
    assert t.with_layout(dp=1).layout.dp == 1
    with pytest.raises(Exception):
        t.with_layout(tp=64)


def test_serve_with_ray_checks_the_topology_first(capsys):
    from kiln.launch.cli import main

    assert main(["serve", "/nonexistent-engine", "--launcher", "ray", "--topology", "nope.yaml"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "topology file 'nope.yaml' does not exist" in err
    assert main(["serve", "/nonexistent-engine", "--launcher", "ray"]) == 2
    assert "needs --topology" in capsys.readouterr().err
