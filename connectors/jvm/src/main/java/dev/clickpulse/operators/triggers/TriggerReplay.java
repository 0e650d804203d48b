package dev.clickpulse.operators.triggers;

import dev.clickpulse.operators.common.OperatorSupport;
import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;

/**
 * Replays a recorded history through {@link TriggerLogic} without Flink, as the operator would see it, for
 * the differential test against ``jobs.triggers.TriggerFunction`` over ``udfs/rules`` (``tests/trigger_replay.py``).
 * Reads JSON lines on stdin:
 *
 * <pre>
 *   ["config", {"file_rules": [...], "snapshot": {...}, "event_filter": [...] | null}]   first line
 *   ["r", rule_id, "&lt;compile_rule_record text&gt;"]     a rules topic record (broadcast side)
 *   ["e", key, "&lt;enriched event JSON&gt;", now_ms]      an event of key; now_ms is the wall clock (fired_at)
 *   ["w", watermark, now_ms]                         fires every timer at or before it, in (time, key) order
 *   ["t", key, at]                                   a timer restored from a checkpoint taken before the
 *                                                    operator kept one timer per key
 * </pre>
 *
 * and writes {@code ["a", key, action]} per action in order, then {@code ["state", key, dump_state JSON]} per
 * key with state (sorted by key), {@code ["counts", {name: total}]}, {@code ["flink_timers", n]} (the most
 * timers one key had registered at once) and {@code ["busy_ns", n]} (CPU time of the replaying thread).
 * Timers behave as Flink's: one per (key, time), including ones registered while firing (the operator keeps
 * one per key, see {@link TriggerLogic}).
 *
 * <p>Run: {@code java -cp clickpulse-operators.jar:<pyflink lib>/* dev.clickpulse.operators.triggers.TriggerReplay
 * [PASSES]}: with PASSES > 1 the history is replayed that many times from empty state (JIT warm-up) and only
 * the last pass is written and timed.
 */
public final class TriggerReplay {
    private TriggerReplay() {}

    private static final class Timer implements Comparable<Timer> {
        final long ts;
        final String key;

        Timer(long ts, String key) {
            this.ts = ts;
            this.key = key;
        }

        @Override
        public int compareTo(Timer o) {
            int c = Long.compare(ts, o.ts);
            return c != 0 ? c : OperatorSupport.compareCodePoints(key, o.key);
        }
    }

    /** One decoded input line. */
    private static final class Op {
        final char kind;
        final String key;
        final String text;
        final byte[] raw;
        final long value;
        final long now;

        Op(char kind, String key, String text, long value, long now) {
            this.kind = kind;
            this.key = key;
            this.text = text;
            this.raw = kind == 'e' ? text.getBytes(StandardCharsets.UTF_8) : null;
            this.value = value;
            this.now = now;
        }
    }

    @SuppressWarnings("unchecked")
    public static void main(String[] args) throws Exception {
        int passes = args.length >= 1 ? Integer.parseInt(args[0]) : 1;
        JsonFactory json = new JsonFactory();
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        Map<String, Object> config = null;
        List<Op> ops = new ArrayList<>();
        String line;
        while ((line = in.readLine()) != null) {
            if (line.isEmpty()) {
                continue;
            }
            List<Object> l = (List<Object>) Json.parse(json, line);
            String op = (String) l.get(0);
            switch (op) {
                case "config":
                    config = (Map<String, Object>) l.get(1);
                    break;
                case "r":
                    ops.add(new Op('r', (String) l.get(1), (String) l.get(2), 0, 0));
                    break;
                case "e":
                    ops.add(new Op('e', (String) l.get(1), (String) l.get(2), 0, ((Number) l.get(3)).longValue()));
                    break;
                case "w":
                    ops.add(new Op('w', null, null, ((Number) l.get(1)).longValue(), ((Number) l.get(2)).longValue()));
                    break;
                case "t":
                    ops.add(new Op('t', (String) l.get(1), null, ((Number) l.get(2)).longValue(), 0));
                    break;
                default:
                    throw new IllegalArgumentException("unknown replay op " + op);
            }
        }
        if (config == null) {
            config = new LinkedHashMap<>();
        }
        for (int i = 1; i < passes; i++) {
            run(json, config, ops, Writer.nullWriter());
        }
        Writer out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.UTF_8), 1 << 16);
        long busyNs = run(json, config, ops, out);
        out.write("[\"busy_ns\"," + busyNs + "]\n");
        out.flush();
    }

    /** One replay from empty state; returns the CPU time of the replaying thread. */
    private static long run(JsonFactory json, Map<String, Object> config, List<Op> ops, Writer out) throws Exception {
        ThreadMXBean bean = ManagementFactory.getThreadMXBean();
        long start = bean.getCurrentThreadCpuTime();
        TriggerLogic logic = new TriggerLogic(json, config);
        Map<String, byte[]> states = new HashMap<>();
        Map<String, long[]> kept = new HashMap<>();
        Map<String, Integer> registered = new HashMap<>();
        int[] most = new int[1];
        TreeSet<Timer> timers = new TreeSet<>();
        String[] current = new String[1];
        TriggerLogic.Store store = new TriggerLogic.Store() {
            @Override
            public byte[] get() {
                return states.get(current[0]);
            }

            @Override
            public void put(byte[] value) {
                states.put(current[0], value);
            }

            @Override
            public void clear() {
                states.remove(current[0]);
            }

            @Override
            public long[] timers() {
                return kept.getOrDefault(current[0], new long[0]);
            }

            @Override
            public void timers(long[] pending) {
                if (pending.length == 0) {
                    kept.remove(current[0]);
                } else {
                    kept.put(current[0], pending);
                }
            }
        };
        TriggerLogic.Sink sink = new TriggerLogic.Sink() {
            @Override
            public void timer(long at) {
                if (timers.add(new Timer(at, current[0]))) {
                    most[0] = Math.max(most[0], registered.merge(current[0], 1, Integer::sum));
                }
            }

            @Override
            public void deleteTimer(long at) {
                if (timers.remove(new Timer(at, current[0]))) {
                    registered.merge(current[0], -1, Integer::sum);
                }
            }

            @Override
            public void action(String userKey, Map<String, Object> action) throws IOException {
                out.write(Json.dumps(List.of("a", current[0], action)));
                out.write('\n');
            }
        };
        for (Op op : ops) {
            switch (op.kind) {
                case 'r':
                    logic.onRuleRecord(op.key, op.text, false);
                    break;
                case 'e':
                    current[0] = op.key;
                    logic.onEvent(op.raw, store, sink, op.now);
                    break;
                case 't':
                    current[0] = op.key;
                    sink.timer(op.value);
                    break;
                default:
                    while (!timers.isEmpty() && timers.first().ts <= op.value) {
                        Timer t = timers.pollFirst();
                        current[0] = t.key;
                        registered.merge(t.key, -1, Integer::sum);
                        logic.onTimer(t.ts, op.value, store, sink, op.now);
                    }
            }
        }
        long busy = bean.getCurrentThreadCpuTime() - start;
        TreeMap<String, byte[]> sorted = new TreeMap<>(OperatorSupport::compareCodePoints);
        sorted.putAll(states);
        for (Map.Entry<String, byte[]> e : sorted.entrySet()) {
            out.write(Json.dumps(List.of("state", e.getKey(), TriggerState.decode(e.getValue()).dumpJson())));
            out.write('\n');
        }
        Map<String, Object> counts = new LinkedHashMap<>();
        for (int i = 0; i < TriggerLogic.COUNTERS.length; i++) {
            counts.put(TriggerLogic.COUNTERS[i], logic.totals[i]);
        }
        out.write(Json.dumps(List.of("counts", counts)));
        out.write('\n');
        out.write(Json.dumps(List.of("flink_timers", (long) most[0])));
        out.write('\n');
        return busy;
    }
}
