package dev.clickpulse.operators.triggers;

import dev.clickpulse.operators.common.CounterLog;
import dev.clickpulse.operators.common.OperatorSupport;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.util.Map;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.BroadcastState;
import org.apache.flink.api.common.state.MapStateDescriptor;
import org.apache.flink.api.common.state.ReadOnlyBroadcastState;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.PrimitiveArrayTypeInfo;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.typeutils.RowTypeInfo;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonGenerator;
import org.apache.flink.streaming.api.TimerService;
import org.apache.flink.streaming.api.functions.co.KeyedBroadcastProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.slf4j.Logger;
import org.slf4j.LoggerFactory;

/**
 * The trigger operator in the JVM: keyed by user_key, enriched events ``(k, v JSON bytes)`` in, actions
 * ``(k user_key, v action JSON)`` out; rule records ``(k rule id, v compile_rule_record text)`` broadcast.
 * The same adapter as ``jobs.triggers.TriggerFunction`` ({@link TriggerLogic}): one ``BYTES`` value state
 * per user ({@link TriggerState}, with a TTL), the user's pending timers in a second value state (no TTL:
 * they leave when they fire) behind one event-time wake-up timer per user, the rule records in broadcast
 * state.
 * Counters ``clickpulse.triggers_<name>`` and the periodic log line are those of the Python operator.
 */
public class TriggersFunction extends KeyedBroadcastProcessFunction<String, Row, Row, Row> {
    private static final long serialVersionUID = 1L;
    private static final Logger LOG = LoggerFactory.getLogger(TriggersFunction.class);

    /** ``(k STRING, v BYTES)`` action rows. */
    public static final RowTypeInfo ROW_TYPE = new RowTypeInfo(
            new TypeInformation<?>[] {Types.STRING, PrimitiveArrayTypeInfo.BYTE_PRIMITIVE_ARRAY_TYPE_INFO},
            new String[] {"k", "v"});

    private static final long[] NO_TIMERS = new long[0];

    private final String configJson;
    private final String userStateName;
    private final MapStateDescriptor<String, String> rulesState;
    private final long stateTtlMs;
    private final String label;
    private final long logIntervalMs;

    private transient ValueState<byte[]> state;
    private transient ValueState<long[]> timers;
    private transient JsonFactory json;
    private transient TriggerLogic logic;
    private transient CounterLog counterLog;
    private transient int subtask;
    private transient ByteArrayOutputStream buffer;
    private transient TriggerLogic.Store store;

    public TriggersFunction(String configJson, String userStateName, MapStateDescriptor<String, String> rulesState,
            long stateTtlMs, String label, long logIntervalMs) {
        this.configJson = configJson;
        this.userStateName = userStateName;
        this.rulesState = rulesState;
        this.stateTtlMs = stateTtlMs;
        this.label = label;
        this.logIntervalMs = logIntervalMs;
    }

    @Override
    @SuppressWarnings("unchecked")
    public void open(OpenContext openContext) throws Exception {
        state = getRuntimeContext().getState(OperatorSupport.bytesState(userStateName, stateTtlMs));
        timers = getRuntimeContext().getState(new ValueStateDescriptor<>(userStateName + "-timers",
                PrimitiveArrayTypeInfo.LONG_PRIMITIVE_ARRAY_TYPE_INFO));
        json = new JsonFactory();
        logic = new TriggerLogic(json, (Map<String, Object>) Json.parse(json, configJson));
        subtask = getRuntimeContext().getTaskInfo().getIndexOfThisSubtask();
        counterLog = new CounterLog(getRuntimeContext().getMetricGroup(), "triggers", TriggerLogic.COUNTERS,
                TriggerLogic.RULE_COUNTERS, subtask, label, logIntervalMs, 500, LOG);
        buffer = new ByteArrayOutputStream(512);
        store = new TriggerLogic.Store() {
            @Override
            public byte[] get() throws IOException {
                return state.value();
            }

            @Override
            public void put(byte[] value) throws IOException {
                state.update(value);
            }

            @Override
            public void clear() {
                state.clear();
            }

            @Override
            public long[] timers() throws IOException {
                long[] pending = timers.value();
                return pending == null ? NO_TIMERS : pending;
            }

            @Override
            public void timers(long[] pending) throws IOException {
                if (pending.length == 0) {
                    timers.clear();
                } else {
                    timers.update(pending);
                }
            }
        };
    }

    @Override
    public void processBroadcastElement(Row value, Context ctx, Collector<Row> out) throws Exception {
        BroadcastState<String, String> broadcast = ctx.getBroadcastState(rulesState);
        if (!logic.restored()) {
            logic.restore(broadcast.immutableEntries());
        }
        String ruleId = (String) field(value, 0, "k");
        String text = (String) field(value, 1, "v");
        if (ruleId == null || text == null) {
            return;
        }
        String keep = logic.onRuleRecord(ruleId, text, subtask == 0);
        if (keep != null) {
            broadcast.put(ruleId, keep);
        }
        maybeFlush(false);
    }

    @Override
    public void processElement(Row value, ReadOnlyContext ctx, Collector<Row> out) throws Exception {
        if (!logic.restored()) {
            ReadOnlyBroadcastState<String, String> broadcast = ctx.getBroadcastState(rulesState);
            logic.restore(broadcast.immutableEntries());
        }
        logic.onEvent((byte[]) field(value, 1, "v"), store, sink(ctx.timerService(), out),
                System.currentTimeMillis());
        maybeFlush(false);
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Row> out) throws Exception {
        if (!logic.restored()) {
            logic.restore(ctx.getBroadcastState(rulesState).immutableEntries());
        }
        TimerService service = ctx.timerService();
        logic.onTimer(timestamp, service.currentWatermark(), store, sink(service, out), System.currentTimeMillis());
        maybeFlush(false);
    }

    private TriggerLogic.Sink sink(TimerService timers, Collector<Row> out) {
        return new TriggerLogic.Sink() {
            @Override
            public void timer(long at) {
                timers.registerEventTimeTimer(at);
            }

            @Override
            public void deleteTimer(long at) {
                timers.deleteEventTimeTimer(at);
            }

            @Override
            public void action(String userKey, Map<String, Object> action) throws IOException {
                out.collect(Row.of(userKey, actionBytes(action)));
            }
        };
    }

    private byte[] actionBytes(Map<String, Object> action) throws IOException {
        buffer.reset();
        try (JsonGenerator g = json.createGenerator(buffer)) {
            Json.generate(g, action);
        }
        return buffer.toByteArray();
    }

    private void maybeFlush(boolean force) {
        counterLog.maybeFlush(logic.totals, force);
    }

    @Override
    public void close() throws Exception {
        if (logic != null) {
            maybeFlush(true);
        }
        super.close();
    }

    /** A field of a position-based or a name-based row. */
    static Object field(Row row, int pos, String name) {
        return OperatorSupport.field(row, pos, name);
    }
}
