"""Switches given as ``--key false`` on the command line (Python Fire passes the string "false")."""

import pytest
from torch import nn

from medsaga_components import as_bool
from medsaga_components.inference.flips import with_test_time_flips
from medsaga_components.training.memory import MemoryConfig
from medsaga_components.prompts.mcp import McpPrompt


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), ("false", False), ("False", False),
                                             ("TRUE", True), (" true ", True), (0, False), (1, True)])
def test_switch_values_read_as_users_mean_them(value, expected):
    assert as_bool(value, "synthesis") is expected


@pytest.mark.parametrize("value", ["no", "", None, 2, 0.5])
def test_other_values_are_refused_with_the_key_named(value):
    with pytest.raises(ValueError, match="test_time_flips must be true or false"):
        as_bool(value, "test_time_flips")


def test_lower_case_false_switches_components_off():
    network = nn.Conv2d(1, 3, 1)
    assert with_test_time_flips(network, "false") is network
    assert MemoryConfig.parse("false") == MemoryConfig.off()
    assert MemoryConfig.parse("true") == MemoryConfig()


def test_mcp_prompts_switch_off_from_the_command_line_spelling():
    # The bundle hands `--modality_prompt false` to McpPrompt as the string "false"; before,
    # bool("false") kept both prompts on (the README's spelling trained the default model).
    prompt = McpPrompt(2, 256, modality_prompt="false", content_prompt="false")
    assert not bool(prompt.use_modality) and not bool(prompt.use_content)
