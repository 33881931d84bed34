"""Stand-in for transformers' tests/utils/test_configuration_utils.py, which its source distribution leaves out.
`ConfigTester` reads `config_common_kwargs` only for configs without sub-configs; ZidongConfig has three."""

config_common_kwargs: dict = {}
