import pytest

from scope_jax.config import default_config
from scope_jax.core.kinds import (
  CLT,
  KINDS,
  SAE,
  SKIP_TRANSCODER,
  TRANSCODER,
  TRANSCODER_KINDS,
  clt_sites,
  config_target_site,
  kind_named,
)


def test_each_kind_says_what_it_predicts_from_the_site_it_reads():
  assert SAE.target_of("res.6") is None
  assert TRANSCODER.target_of("mlp_in.6") == "mlp.6" and SKIP_TRANSCODER.target_of("mlp_in.12") == "mlp.12"
  assert TRANSCODER.target_of("mlp_in.6", "mlp.7") == "mlp.7"  # an explicit target wins
  assert TRANSCODER.target_of("res.6") is None  # no default target for another site
  assert [k.name for k in KINDS.values() if k.transcoder] == ["transcoder", "skip_transcoder", "clt"]
  assert TRANSCODER_KINDS == ("transcoder", "skip_transcoder")  # one layer each; a CLT spans layers
  assert SKIP_TRANSCODER.skip and not TRANSCODER.skip and CLT.cross_layer and not TRANSCODER.cross_layer
  assert clt_sites([3, 4]) == (["mlp_in.3", "mlp_in.4"], ["mlp.3", "mlp.4"])


def test_a_configs_target_site_follows_its_kind():
  c = default_config()
  c.site = "mlp_in.3"
  assert config_target_site(c) is None  # kind sae
  c.kind = "transcoder"
  assert config_target_site(c) == "mlp.3"


def test_an_unknown_kind_is_an_error_naming_the_field_and_the_kinds():
  with pytest.raises(
    ValueError, match=r"kind 'topk': expected one of \['sae', 'transcoder', 'skip_transcoder', 'clt'\]"
  ):
    kind_named("topk")
  with pytest.raises(ValueError, match=r"index kind 'x'"):
    kind_named("x", field="index kind")
