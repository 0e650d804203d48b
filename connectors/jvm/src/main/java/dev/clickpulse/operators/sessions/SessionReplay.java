package dev.clickpulse.operators.sessions;

import java.io.BufferedReader;
import java.io.BufferedWriter;
import java.io.IOException;
import java.io.InputStreamReader;
import java.io.OutputStreamWriter;
import java.io.Writer;
import java.lang.management.ManagementFactory;
import java.lang.management.ThreadMXBean;
import java.nio.charset.StandardCharsets;
import java.util.Comparator;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.List;
import java.util.Map;
import java.util.TreeMap;
import java.util.TreeSet;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonGenerator;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonParser;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonToken;

/**
 * Replays a recorded history through {@link SessionReducer} without Flink, as the operator would see it,
 * for the differential test against ``udfs/sessions.py``. Reads JSON lines on stdin:
 *
 * <pre>
 *   ["e", key, "&lt;enriched event JSON&gt;"]   an event for key (the current watermark applies)
 *   ["w", watermark]                       a watermark: fires every timer at or before it, in (time, key) order
 * </pre>
 *
 * and writes, in order: {@code ["s", key, session_id, record]} per session record,
 * {@code ["l", key, "<event JSON>"]} per too-late or malformed event, then at the end
 * {@code ["state", key, dump_state JSON]} per key with state (sorted by key) and
 * {@code ["counts", {name: total}]} and {@code ["busy_ns", n]} (CPU time of the replaying thread, for the bench).
 * States are kept encoded ({@link StateCodec}) as the operator keeps them. Timers behave as Flink's: one per (key, time), fired when a
 * watermark reaches them, including ones registered while firing.
 *
 * <p>Run: {@code java -cp clickpulse-operators.jar:<flink-dist> dev.clickpulse.operators.sessions.SessionReplay
 * GAP_MS MAX_MS LATENESS_MS OUT_OF_ORDERNESS_MS [PASSES]}: with PASSES > 1 the history is replayed that
 * many times from empty state (JIT warm-up) and only the last pass is written and timed.
 */
public final class SessionReplay {
    private SessionReplay() {}

    private static final class Timer {
        final long ts;
        final String key;

        Timer(long ts, String key) {
            this.ts = ts;
            this.key = key;
        }
    }

    /** One input line: an event (key, value) or a watermark (key null), decoded before the timed replay. */
    private static final class Op {
        final String key;
        final String value;
        final byte[] raw;
        final long watermark;

        Op(String key, String value, long watermark) {
            this.key = key;
            this.value = value;
            this.raw = value == null ? null : value.getBytes(StandardCharsets.UTF_8);
            this.watermark = watermark;
        }

        static Op parse(JsonFactory json, String line) throws IOException {
            try (JsonParser p = json.createParser(line)) {
                p.nextToken(); // [
                p.nextToken();
                String op = p.getText();
                p.nextToken();
                if (op.equals("e")) {
                    String key = p.getText();
                    p.nextToken();
                    return new Op(key, p.getText(), 0);
                }
                if (op.equals("w")) {
                    return new Op(null, null, p.getLongValue());
                }
                throw new IllegalArgumentException("unknown replay op " + op);
            }
        }
    }

    private static final Comparator<Timer> ORDER = (a, b) -> {
        int c = Long.compare(a.ts, b.ts);
        return c != 0 ? c : Touch.compareCodePoints(a.key, b.key);
    };

    public static void main(String[] args) throws IOException {
        SessionConfig cfg = args.length >= 4
                ? new SessionConfig(Long.parseLong(args[0]), Long.parseLong(args[1]), Long.parseLong(args[2]),
                        Long.parseLong(args[3]))
                : SessionConfig.defaults();
        int passes = args.length >= 5 ? Integer.parseInt(args[4]) : 1;
        BufferedReader in = new BufferedReader(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        List<Op> lines = new ArrayList<>();
        JsonFactory reader = new JsonFactory();
        String line;
        while ((line = in.readLine()) != null) {
            if (!line.isEmpty()) {
                lines.add(Op.parse(reader, line));
            }
        }
        // earlier passes only warm the JIT up; the last one is reported
        for (int i = 1; i < passes; i++) {
            run(lines, cfg, Writer.nullWriter());
        }
        Writer out = new BufferedWriter(new OutputStreamWriter(System.out, StandardCharsets.UTF_8), 1 << 16);
        long busyNs = run(lines, cfg, out);
        out.write("[\"busy_ns\"," + busyNs + "]\n");
        out.flush();
    }

    /** One replay of ``lines`` from empty state, transcript to ``out``; returns the time spent. */
    private static long run(List<Op> lines, SessionConfig cfg, Writer out) throws IOException {
        JsonFactory json = new JsonFactory();
        SessionJson render = new SessionJson(json);
        Map<String, byte[]> states = new HashMap<>();
        StateCodec codec = new StateCodec();
        TreeSet<Timer> timers = new TreeSet<>(ORDER);
        long[] totals = new long[SessionizeFunction.COUNTERS.length];
        long watermark = Long.MIN_VALUE;

        JsonGenerator g = json.createGenerator(out);
        g.setRootValueSeparator(null);
        g.disable(JsonGenerator.Feature.FLUSH_PASSED_TO_STREAM);
        ThreadMXBean cpu = ManagementFactory.getThreadMXBean();
        long start = cpu.getCurrentThreadCpuTime();
        for (Op op : lines) {
            if (op.key != null) {
                String key = op.key;
                SessionEvent ev;
                try {
                    ev = SessionEvent.parse(json, op.raw);
                } catch (MalformedEventException e) {
                    totals[totals.length - 1]++;
                    late(g, out, key, op.value);
                    continue;
                }
                totals[0]++;
                KeyState before = StateCodec.decode(states.get(key));
                StepResult res = SessionReducer.step(before, ev, watermark, cfg);
                apply(g, out, render, codec, states, timers, totals, key, before, res, op.value);
            } else {
                if (op.watermark > watermark) {
                    watermark = op.watermark;
                }
                while (!timers.isEmpty() && timers.first().ts <= watermark) {
                    Timer t = timers.pollFirst();
                    KeyState before = StateCodec.decode(states.get(t.key));
                    StepResult res = SessionReducer.onTimer(before, t.ts, cfg);
                    apply(g, out, render, codec, states, timers, totals, t.key, before, res, null);
                }
            }
        }
        g.flush();
        long busyNs = cpu.getCurrentThreadCpuTime() - start;
        for (Map.Entry<String, byte[]> e : new TreeMap<>(states).entrySet()) {
            g.writeStartArray();
            g.writeString("state");
            g.writeString(e.getKey());
            g.writeRawValue(new String(render.state(StateCodec.decode(e.getValue())), StandardCharsets.UTF_8));
            g.writeEndArray();
            g.writeRaw('\n');
        }
        g.writeStartArray();
        g.writeString("counts");
        g.writeStartObject();
        for (int i = 0; i < totals.length; i++) {
            g.writeNumberField(SessionizeFunction.COUNTERS[i], totals[i]);
        }
        g.writeEndObject();
        g.writeEndArray();
        g.writeRaw('\n');
        g.flush();
        return busyNs;
    }

    private static void late(JsonGenerator g, Writer out, String key, String value) throws IOException {
        g.writeStartArray();
        g.writeString("l");
        g.writeString(key);
        g.writeString(value);
        g.writeEndArray();
        g.writeRaw('\n');
    }

    private static void apply(JsonGenerator g, Writer out, SessionJson render, StateCodec codec,
            Map<String, byte[]> states,
            TreeSet<Timer> timers, long[] totals, String key, KeyState before, StepResult res, String value)
            throws IOException {
        if (res.state != before) {
            if (res.state.isEmpty()) {
                states.remove(key);
            } else {
                states.put(key, codec.encode(res.state));
            }
        }
        for (long t : res.timers) {
            timers.add(new Timer(t, key));
        }
        for (Emit e : res.emits) {
            if (e instanceof SessionRecord) {
                SessionRecord r = (SessionRecord) e;
                g.writeStartArray();
                g.writeString("s");
                g.writeString(key);
                g.writeString(r.sessionId);
                g.writeRawValue(new String(render.record(r), StandardCharsets.UTF_8));
                g.writeEndArray();
                g.writeRaw('\n');
            } else {
                late(g, out, ((LateEvent) e).userKey, value);
            }
        }
        int[] v = res.counts.values();
        for (int i = 0; i < v.length; i++) {
            totals[i + 1] += v[i];
        }
    }
}
