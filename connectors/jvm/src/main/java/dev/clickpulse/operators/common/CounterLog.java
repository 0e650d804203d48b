package dev.clickpulse.operators.common;

import java.util.Set;
import org.apache.flink.metrics.Counter;
import org.apache.flink.metrics.MetricGroup;
import org.slf4j.Logger;

/**
 * An operator's counters, as ``connectors.flink.OperatorCounters`` keeps those of the Python operators:
 * totals counted in a plain array on the hot path, pushed to Flink counters ``clickpulse.<prefix>_<name>``
 * at most every ``flushMs``, and a log line ``<label>[subtask]: name=total …`` every ``logIntervalMs``.
 * ``shared`` counters count the same on every subtask (broadcast rules): only subtask 0 reports them.
 */
public final class CounterLog {
    private final String[] names;
    private final Counter[] counters;
    private final long[] flushed;
    private final int subtask;
    private final String label;
    private final long logIntervalMs;
    private final long flushMs;
    private final Logger log;
    private long nextFlush;
    private long nextLog;

    public CounterLog(MetricGroup metrics, String prefix, String[] names, Set<String> shared, int subtask,
            String label, long logIntervalMs, long flushMs, Logger log) {
        this.names = names;
        this.subtask = subtask;
        this.label = label;
        this.logIntervalMs = logIntervalMs;
        this.flushMs = flushMs;
        this.log = log;
        MetricGroup group = metrics.addGroup("clickpulse");
        counters = new Counter[names.length];
        for (int i = 0; i < names.length; i++) {
            if (subtask == 0 || !shared.contains(names[i])) {
                counters[i] = group.counter(prefix + "_" + names[i]);
            }
        }
        flushed = new long[names.length];
        long now = System.currentTimeMillis();
        nextFlush = now + flushMs;
        nextLog = now + logIntervalMs;
    }

    /** Push ``totals`` (same order as the names) when a flush is due or ``force``; log when the line is due. */
    public void maybeFlush(long[] totals, boolean force) {
        long now = System.currentTimeMillis();
        if (!force && now < nextFlush) {
            return;
        }
        nextFlush = now + flushMs;
        for (int i = 0; i < names.length; i++) {
            long delta = totals[i] - flushed[i];
            if (delta != 0 && counters[i] != null) {
                counters[i].inc(delta);
            }
            flushed[i] = totals[i];
        }
        if (force || now >= nextLog) {
            nextLog = now + logIntervalMs;
            StringBuilder line = new StringBuilder();
            for (int i = 0; i < names.length; i++) {
                line.append(i == 0 ? "" : " ").append(names[i]).append('=').append(totals[i]);
            }
            log.info("{}[{}]: {}", label, subtask, line);
        }
    }
}
