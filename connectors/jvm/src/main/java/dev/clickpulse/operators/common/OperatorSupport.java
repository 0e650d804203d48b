package dev.clickpulse.operators.common;

import java.time.Duration;
import org.apache.flink.api.common.state.StateTtlConfig;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.PrimitiveArrayTypeInfo;
import org.apache.flink.types.Row;

/** What clickpulse's keyed operators share: their state descriptor, row access, Python's string order. */
public final class OperatorSupport {
    private OperatorSupport() {}

    /**
     * A ``BYTES`` value state; with ``ttlMs`` > 0 a processing-time TTL refreshed on every write, expired
     * values never returned (a safety net: timers clear state normally).
     */
    public static ValueStateDescriptor<byte[]> bytesState(String name, long ttlMs) {
        ValueStateDescriptor<byte[]> descriptor =
                new ValueStateDescriptor<>(name, PrimitiveArrayTypeInfo.BYTE_PRIMITIVE_ARRAY_TYPE_INFO);
        if (ttlMs > 0) {
            descriptor.enableTimeToLive(StateTtlConfig.newBuilder(Duration.ofMillis(ttlMs))
                    .setUpdateType(StateTtlConfig.UpdateType.OnCreateAndWrite)
                    .setStateVisibility(StateTtlConfig.StateVisibility.NeverReturnExpired)
                    .build());
        }
        return descriptor;
    }

    /** A field of a position-based or a name-based row. */
    public static Object field(Row row, int pos, String name) {
        return row.getFieldNames(false) == null ? row.getField(pos) : row.getField(name);
    }

    /** Python's ``str`` order (code points), which differs from ``String.compareTo`` (UTF-16 units). */
    public static int compareCodePoints(String a, String b) {
        int i = 0;
        int j = 0;
        while (i < a.length() && j < b.length()) {
            int x = a.codePointAt(i);
            int y = b.codePointAt(j);
            if (x != y) {
                return Integer.compare(x, y);
            }
            i += Character.charCount(x);
            j += Character.charCount(y);
        }
        return Integer.compare(a.length() - i, b.length() - j);
    }
}
