"""Benchmark EMDC against the real brokers: ``make bench`` or ``python -m bench [options]``.

Everything below is measured in one run, each measurement on its own exchange,
queue, topic prefix and state directories, all removed afterwards:

ceiling         pika consuming and acknowledging N small persistent messages (prefetch 1000, one
                ``multiple=True`` ack every 200), no processing: what this broker can do for this load.
writer_drain    ``emdc writer`` (default settings: fsync'd state before every ack) draining a backlog
                of the same N pulses, from its consumer appearing until an MQTT subscriber receives
                the exact final total; also as a ratio to the ceiling.
naive_baseline  the seed's per-message design, re-implemented here: prefetch 1; per message update the
                JSON state with fsync, publish the four values at QoS 1 waiting for each PUBACK, ack.
live_latency    pulses at 10/s in real time into a running writer; latency from the pulse's ``ts_ns``
                to the arrival of its energy value at an MQTT subscriber (p50, p99, max), published
                directly with pika and, end to end, by ``emdc edge simulate --speed 1``.
edge            outbox replay rate (a pre-filled outbox drained with confirms), ``emdc edge simulate
                --speed max`` rate, and peak RSS and CPU time per 1,000 pulses at 30 pulses/s, projected
                to a Raspberry Pi Zero, for ``emdc edge simulate --speed 1`` and for the production chain
                alone (``--edge-harness``: EdgeService as ``emdc edge run`` builds it, on a mock pin fed
                the way lgpio feeds it), the latter also at a household rate of 3 pulses/s.
power_truth     seeded household loads (7 days each) replayed through the real writer and idle handler:
                MAE of the published power against the true load, over the run and in the 5 minutes after
                load drops, next to ESPHome pulse_meter's hold rule and Home Assistant's derivative helper;
                power messages per second per channel. In-process: needs no broker.
state_scaling   the writer in-process on its real state store: a one-pulse batch's cost and a backlog's drain
                rate with 1, 1,000, 10,000 (and 100,000) meters in the state, as ratios to 1 meter: the cost
                of a batch must follow the batch, not the number of meters. Needs no broker either.
million         (``--million`` only) edge -> broker -> writer on 1,000,000 pulses, sampling both
                processes' RSS and state-file sizes: memory and state must stay flat.

The results print as a table and go to ``bench-results.json`` (git-ignored). Timings are
informative: targets are marked PASS/MISS but nothing here fails on them. ``--size small``
runs everything in under a minute; tests/test_bench.py runs it smaller still in CI. Method,
figures and the Pi Zero assumption: docs/performance.md.

Where it lives: ``__main__`` (options, sizes, the run), ``ceiling``, ``writer`` (drain, naive
baseline, live latency), ``edge`` (replay, simulate, live CPU and RSS, the Pi Zero projection),
``million``, ``power_truth``, ``state_scaling``, ``report`` (targets, the table, py-spy summaries),
``harness`` (the bench's own plumbing) and ``brokers`` (addresses and per-run names, shared with tests/).
A developer tool: not installed with the package, and it never imports from tests/.
"""
