import json

import pytest

from scope_jax.export.entries import ExportEntry, index_json, read_index


def _entry(**changes) -> ExportEntry:
  fields = dict(
    name="w64-l0.001-s0",
    kind="transcoder",
    input_site="mlp_in.2",
    output_site="mlp.2",
    prefixes=(),
    width=64,
    l1_coefficient=1e-3,
    seed=0,
    step=30,
    l0=12.5,
    dead_fraction=0.0,
    scale=2.0,
    target_scale=3.0,
    epochs=1.5,
    measured_rows=512,
    files={"gemma_scope": "a/params.npz", "gemma_scope_2": "b", "saelens": "c"},
  )
  return ExportEntry(**fields | changes)


def test_the_index_file_keeps_its_field_names_and_reads_back_as_the_entries(tmp_path):
  sae = _entry(kind="sae", input_site="res.2", output_site="res.2", target_scale=None, prefixes=(16, 64))
  entries = [_entry(), sae]
  (tmp_path / "index.json").write_text(index_json(entries))
  rows = json.loads((tmp_path / "index.json").read_text())
  assert (rows[0]["site"], rows[0]["target_site"]) == ("mlp_in.2", "mlp.2")  # input, a transcoder's output
  assert (rows[1]["site"], rows[1]["target_site"]) == ("res.2", None)  # an SAE writes where it reads
  assert rows[0]["gemma_scope"] == "a/params.npz" and "files" not in rows[0]  # paths stay top-level keys
  assert list(rows[0])[:4] == ["name", "kind", "site", "target_site"]
  assert read_index(tmp_path / "index.json") == entries


def test_a_damaged_index_is_an_error_naming_the_file_and_what_is_missing(tmp_path):
  path = tmp_path / "index.json"
  path.write_text("[{")
  with pytest.raises(ValueError, match=f"{path}: not an export index, a JSON list of entries"):
    read_index(path)
  path.write_text('{"name": "x"}')
  with pytest.raises(ValueError, match="not an export index"):
    read_index(path)
  row = _entry().to_json()
  del row["l0"]
  path.write_text(json.dumps([row]))
  with pytest.raises(ValueError, match=r"entry 'w64-l0.001-s0' has no field 'l0'; re-run `scope-jax export`"):
    read_index(path)
