"""The memory-at-scale calculation (``python -m benchmarks.memory_at_scale``): the issue's figures, from the estimator HRP logs."""

from benchmarks import memory_at_scale


def test_llama_7b_preheat_adapters_and_the_settings_that_keep_a_4_bit_run_within_1_1x(capsys):
    ratios = memory_at_scale.main()
    out = capsys.readouterr().out
    # R = 64 on LLaMA-7B's 224 layers: 64 * sum(in + out) = 159.9M parameters, 0.596 GiB in float32.
    assert "| float32, AdamW | 0.596 | 0.596 | 1.191 | 2.383 |" in out
    four_bit_columns = range(len(memory_at_scale.ACTIVATIONS_GIB))
    within = {name for name, row in ratios.items() if all(row[i] <= 1.1 for i in four_bit_columns)}
    assert within == {"bfloat16, FactoredRMS"}
    # Every setting costs more than the main step on either base, and the lean ones cost less than the default.
    assert all(ratio > 1 for row in ratios.values() for ratio in row)
    default = ratios["float32, AdamW"]
    assert all(ratio < base for name, row in ratios.items() if name != "float32, AdamW" for ratio, base in zip(row, default))
