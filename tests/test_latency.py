"""Latency statistics: HdrHistogram percentiles vs exact numpy, hgrm, table, plot."""

import numpy as np
import pytest

from replay.latency import format_table, latency_stats, plot_percentiles, write_hgrm


def _lat(n=100_000, seed=3):
    rng = np.random.default_rng(seed)
    return (rng.lognormal(np.log(12_000), 0.4, n) + rng.pareto(2.5, n) * 3_000).astype(np.int64)


def test_histogram_percentiles_are_within_hdr_precision_of_exact_ones():
    v = _lat()
    s = latency_stats(v)
    sv = np.sort(v)
    for key, p in (("p50", 50), ("p90", 90), ("p99", 99), ("p999", 99.9)):
        # HdrHistogram's rank: the value below which round(p% of n) samples lie
        exact = sv[max(int(p / 100 * v.size + 0.5), 1) - 1]
        assert abs(s.percentiles[key] - exact) <= exact * 0.001 + 1, key
    assert s.max == v.max() and s.count == v.size
    assert abs(s.mean - v.mean()) < 1e-6


def test_values_beyond_one_hour_are_counted_out_of_range_not_dropped():
    v = np.array([1000, 2000, 5 * 3_600 * 10**9], dtype=np.int64)
    s = latency_stats(v)
    assert s.out_of_range == 1 and s.count == 3 and s.max == v.max()


def test_empty_latency_array_gives_zero_stats():
    s = latency_stats(np.array([], dtype=np.int64))
    assert s.count == 0 and s.percentiles["p99"] == 0


def test_hgrm_is_in_microseconds_and_its_max_matches(tmp_path):
    v = _lat(10_000)
    text = write_hgrm(v, tmp_path / "x.hgrm").read_text()
    assert "1/(1-Percentile)" in text
    max_line = next(line for line in text.splitlines() if line.startswith("#[Max"))
    max_us = float(max_line.split("=")[1].split(",")[0])
    assert abs(max_us - v.max() / 1000) <= v.max() / 1000 * 0.001 + 0.01


def test_table_shows_each_percentile_in_microseconds():
    s = latency_stats(np.full(1000, 15_000, dtype=np.int64))
    t = format_table({"a": s, "b": s}, throughput={"a": 1000.0, "b": 2000.0})
    assert "p99.99" in t and "15.00" in t and "2,000" in t


def test_percentile_plot_is_a_png(tmp_path):
    p = plot_percentiles({"one": _lat(5000), "two": _lat(5000, 4) * 2}, tmp_path / "p.png")
    assert p.read_bytes()[:4] == b"\x89PNG"


def test_the_one_histogram_equals_hdrhistogram_fed_value_by_value_in_any_batching(tmp_path):
    """LatencyHistogram (replay whole / chunked, service status) = HdrHistogram of the raw values."""
    from hdrh.histogram import HdrHistogram

    from replay.latency import LatencyHistogram, latency_stats

    rng = np.random.default_rng(3)
    v = np.concatenate([rng.lognormal(7.5, 0.6, 50_000), rng.uniform(1, 5e7, 500), [1, 2047, 2048, 2049]])
    v = rng.permutation(v.astype(np.int64))
    ref = HdrHistogram(1, 3_600 * 1_000_000_000, 3)
    for x in v.tolist():
        ref.record_value(x)
    st = latency_stats(v)
    for key, p in {"p50": 50.0, "p90": 90.0, "p99": 99.0, "p999": 99.9, "p9999": 99.99}.items():
        assert st.percentiles[key] == min(ref.get_value_at_percentile(p), int(v.max())), key
    assert (st.count, st.max, st.min) == (v.size, int(v.max()), int(v.min()))
    assert st.mean == pytest.approx(float(v.mean()), rel=1e-12)
    # drained in pieces, from a ring, as the chunked replay and the service do
    ring_in = np.zeros(1 << 16, dtype=np.int64)
    ring_out = np.zeros(1 << 16, dtype=np.int64)
    h = LatencyHistogram()
    for a in range(0, v.size, 7_000):
        part = v[a : a + 7_000]
        idx = np.arange(a, a + part.size) & (ring_in.size - 1)
        ring_in[idx] = 1_000
        ring_out[idx] = 1_000 + part
        h.add_ring(ring_in, ring_out, ring_in.size - 1, a, a + part.size)
    assert h.stats() == st
    h.write_hgrm(tmp_path / "ring.hgrm")
    write_hgrm(v, tmp_path / "whole.hgrm")
    assert (tmp_path / "ring.hgrm").read_text() == (tmp_path / "whole.hgrm").read_text()
