package dev.clickpulse.operators.sessions;

import dev.clickpulse.operators.common.CounterLog;
import dev.clickpulse.operators.common.OperatorSupport;
import java.util.Set;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.typeinfo.PrimitiveArrayTypeInfo;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The sessions operator in the JVM: keyed by user_key, rows ``(k user_key, v enriched event JSON)`` in,
 * ``(k session_id, v session record JSON)`` out, too-late and malformed events as received to the side
 * output {@link #LATE}. The same adapter as ``jobs.sessionize.SessionizeFunction``: it loads/stores one
 * ``BYTES`` value state ({@link StateCodec}, TTL as a safety net) and registers event-time timers; the
 * logic is {@link SessionReducer}. Counters ``clickpulse.sessions_<name>`` and the periodic log line
 * ``<label>[subtask]: events=… …`` are those of the Python operator.
 */
public class SessionizeFunction extends KeyedProcessFunction<String, Row, Row> {
    private static final long serialVersionUID = 1L;
    private static final Logger LOG = LoggerFactory.getLogger(SessionizeFunction.class);

    /** ``(k STRING, v BYTES)`` rows of both outputs. */
    public static final RowTypeInfo ROW_TYPE = new RowTypeInfo(
            new TypeInformation<?>[] {Types.STRING, PrimitiveArrayTypeInfo.BYTE_PRIMITIVE_ARRAY_TYPE_INFO},
            new String[] {"k", "v"});
    /** Too-late events and malformed records, as received, keyed by user_key. */
    public static final OutputTag<Row> LATE = new OutputTag<>("late-events", ROW_TYPE);

    private final SessionConfig config;
    private final String stateName;
    private final long stateTtlMs;
    private final String label;
    private final long logIntervalMs;

    private transient ValueState<byte[]> state;
    private transient JsonFactory json;
    private transient SessionJson records;
    private transient StateCodec codec;
    private transient long[] totals;
    private transient CounterLog counterLog;

    /** Counter names: ``events``, the reducer's {@link Counts#NAMES}, ``malformed``. */
    static final String[] COUNTERS;

    static {
        COUNTERS = new String[Counts.NAMES.length + 2];
        COUNTERS[0] = "events";
        System.arraycopy(Counts.NAMES, 0, COUNTERS, 1, Counts.NAMES.length);
        COUNTERS[COUNTERS.length - 1] = "malformed";
    }

    public SessionizeFunction(SessionConfig config, String stateName, long stateTtlMs, String label,
            long logIntervalMs) {
        this.config = config;
        this.stateName = stateName;
        this.stateTtlMs = stateTtlMs;
        this.label = label;
        this.logIntervalMs = logIntervalMs;
    }

    @Override
    public void open(OpenContext openContext) {
        state = getRuntimeContext().getState(OperatorSupport.bytesState(stateName, stateTtlMs));
        json = new JsonFactory();
        records = new SessionJson(json);
        codec = new StateCodec();
        totals = new long[COUNTERS.length];
        counterLog = new CounterLog(getRuntimeContext().getMetricGroup(), "sessions", COUNTERS, Set.of(),
                getRuntimeContext().getTaskInfo().getIndexOfThisSubtask(), label, logIntervalMs, 1000, LOG);
    }

    @Override
    public void processElement(Row value, Context ctx, Collector<Row> out) throws Exception {
        String key = (String) field(value, 0, "k");
        byte[] raw = (byte[]) field(value, 1, "v");
        SessionEvent ev;
        try {
            ev = SessionEvent.parse(json, raw);
        } catch (MalformedEventException e) {
            LOG.warn("malformed enriched event for key {}: {}", key, e.getMessage());
            totals[COUNTERS.length - 1]++;
            ctx.output(LATE, Row.of(key, raw));
            return;
        }
        totals[0]++;
        KeyState before = StateCodec.decode(state.value());
        StepResult res = SessionReducer.step(before, ev, ctx.timerService().currentWatermark(), config);
        apply(before, res, ctx.timerService(), out, ctx, raw);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        KeyState before = StateCodec.decode(state.value());
        StepResult res = SessionReducer.onTimer(before, timestamp, config);
        apply(before, res, ctx.timerService(), out, null, null);
    }

    private void apply(KeyState before, StepResult res, org.apache.flink.streaming.api.TimerService timers,
            Collector<Row> out, Context ctx, byte[] raw) throws Exception {
        if (res.state != before) {
            if (res.state.isEmpty()) {
                state.clear();
            } else {
                state.update(codec.encode(res.state));
            }
        }
        for (long t : res.timers) {
            timers.registerEventTimeTimer(t);
        }
        for (Emit e : res.emits) {
            if (e instanceof SessionRecord) {
                SessionRecord r = (SessionRecord) e;
                out.collect(Row.of(r.sessionId, records.record(r)));
            } else {
                ctx.output(LATE, Row.of(((LateEvent) e).userKey, raw));
            }
        }
        if (!res.counts.isZero()) {
            int[] v = res.counts.values();
            for (int i = 0; i < v.length; i++) {
                totals[i + 1] += v[i];
            }
        }
        maybeFlush(false);
    }

    private void maybeFlush(boolean force) {
        counterLog.maybeFlush(totals, force);
    }

    @Override
    public void close() throws Exception {
        if (totals != null) {
            maybeFlush(true);
        }
        super.close();
    }

    /** A field of a position-based or a name-based row. */
    static Object field(Row row, int pos, String name) {
        return OperatorSupport.field(row, pos, name);
    }
}
