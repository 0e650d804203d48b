package dev.clickpulse.operators.triggers;

import java.io.ByteArrayInputStream;
import java.io.ByteArrayOutputStream;
import java.io.DataInputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

/**
 * {@code udfs.rules.evaluate.UserState}: per rule id (in insertion order, as a Python dict keeps it) that
 * rule's state. Encoded compactly for Flink keyed state ({@link #encode} / {@link #decode}); {@link #dumpJson}
 * renders {@code dump_state}'s JSON for the differential test.
 */
final class TriggerState {
    /** Nullable longs are stored as this. */
    static final long NONE = Long.MIN_VALUE;

    String userKey;
    final LinkedHashMap<String, RuleState> rules;

    TriggerState(String userKey, LinkedHashMap<String, RuleState> rules) {
        this.userKey = userKey;
        this.rules = rules;
    }

    boolean isEmpty() {
        return rules.isEmpty();
    }

    /** One rule's state. */
    abstract static class RuleState {
        final String fingerprint;

        RuleState(String fingerprint) {
            this.fingerprint = fingerprint;
        }
    }

    /** {@code GroupState}: hits sorted by (time, message id), newest event time, fire bookkeeping. */
    static final class Group {
        final long[] hitTs;
        final String[] hitIds;
        final long maxTs;
        final long lastFired;

        Group(long[] hitTs, String[] hitIds, long maxTs, long lastFired) {
            this.hitTs = hitTs;
            this.hitIds = hitIds;
            this.maxTs = maxTs;
            this.lastFired = lastFired;
        }
    }

    static final class Count extends RuleState {
        final LinkedHashMap<String, Group> groups;

        Count(String fingerprint, LinkedHashMap<String, Group> groups) {
            super(fingerprint);
            this.groups = groups;
        }
    }

    static final class Sequence extends RuleState {
        final long pendingMs;
        final String pendingMessageId;
        final long lastFired;

        Sequence(String fingerprint, long pendingMs, String pendingMessageId, long lastFired) {
            super(fingerprint);
            this.pendingMs = pendingMs;
            this.pendingMessageId = pendingMessageId;
            this.lastFired = lastFired;
        }
    }

    static final class Returning extends RuleState {
        final long lastSeen;
        final long lastFired;

        Returning(String fingerprint, long lastSeen, long lastFired) {
            super(fingerprint);
            this.lastSeen = lastSeen;
            this.lastFired = lastFired;
        }
    }

    // ------------------------------------------------------------------------------------------ codec

    private static final int VERSION = 1;

    static TriggerState empty() {
        return new TriggerState("", new LinkedHashMap<>());
    }

    /** The state bytes, {@code null} for an empty state (the operator clears its keyed state then). */
    byte[] encode() {
        if (isEmpty()) {
            return null;
        }
        ByteArrayOutputStream buf = new ByteArrayOutputStream(128);
        try (DataOutputStream out = new DataOutputStream(buf)) {
            out.writeByte(VERSION);
            str(out, userKey);
            out.writeInt(rules.size());
            for (Map.Entry<String, RuleState> e : rules.entrySet()) {
                str(out, e.getKey());
                RuleState rs = e.getValue();
                if (rs instanceof Count) {
                    out.writeByte('c');
                    str(out, rs.fingerprint);
                    Count c = (Count) rs;
                    out.writeInt(c.groups.size());
                    for (Map.Entry<String, Group> ge : c.groups.entrySet()) {
                        str(out, ge.getKey());
                        Group g = ge.getValue();
                        out.writeLong(g.maxTs);
                        out.writeLong(g.lastFired);
                        out.writeInt(g.hitTs.length);
                        for (int i = 0; i < g.hitTs.length; i++) {
                            out.writeLong(g.hitTs[i]);
                            str(out, g.hitIds[i]);
                        }
                    }
                } else if (rs instanceof Sequence) {
                    Sequence s = (Sequence) rs;
                    out.writeByte('s');
                    str(out, rs.fingerprint);
                    out.writeLong(s.pendingMs);
                    out.writeBoolean(s.pendingMessageId != null);
                    if (s.pendingMessageId != null) {
                        str(out, s.pendingMessageId);
                    }
                    out.writeLong(s.lastFired);
                } else {
                    Returning r = (Returning) rs;
                    out.writeByte('r');
                    str(out, rs.fingerprint);
                    out.writeLong(r.lastSeen);
                    out.writeLong(r.lastFired);
                }
            }
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return buf.toByteArray();
    }

    static TriggerState decode(byte[] data) {
        if (data == null || data.length == 0) {
            return empty();
        }
        try (DataInputStream in = new DataInputStream(new ByteArrayInputStream(data))) {
            int version = in.readByte();
            if (version != VERSION) {
                throw new IllegalStateException("unsupported trigger state version " + version);
            }
            String userKey = str(in);
            int n = in.readInt();
            LinkedHashMap<String, RuleState> rules = new LinkedHashMap<>();
            for (int i = 0; i < n; i++) {
                String id = str(in);
                int kind = in.readByte();
                String fp = str(in);
                if (kind == 'c') {
                    int groups = in.readInt();
                    LinkedHashMap<String, Group> gm = new LinkedHashMap<>();
                    for (int j = 0; j < groups; j++) {
                        String key = str(in);
                        long maxTs = in.readLong();
                        long lastFired = in.readLong();
                        int hits = in.readInt();
                        long[] ts = new long[hits];
                        String[] ids = new String[hits];
                        for (int h = 0; h < hits; h++) {
                            ts[h] = in.readLong();
                            ids[h] = str(in);
                        }
                        gm.put(key, new Group(ts, ids, maxTs, lastFired));
                    }
                    rules.put(id, new Count(fp, gm));
                } else if (kind == 's') {
                    long pending = in.readLong();
                    String mid = in.readBoolean() ? str(in) : null;
                    rules.put(id, new Sequence(fp, pending, mid, in.readLong()));
                } else if (kind == 'r') {
                    long lastSeen = in.readLong();
                    rules.put(id, new Returning(fp, lastSeen, in.readLong()));
                } else {
                    throw new IllegalStateException("unknown rule state kind " + kind);
                }
            }
            return new TriggerState(userKey, rules);
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
    }

    private static void str(DataOutputStream out, String s) throws IOException {
        byte[] b = s.getBytes(StandardCharsets.UTF_8);
        out.writeInt(b.length);
        out.write(b);
    }

    private static String str(DataInputStream in) throws IOException {
        byte[] b = new byte[in.readInt()];
        in.readFully(b);
        return new String(b, StandardCharsets.UTF_8);
    }

    // ------------------------------------------------------------------------------------------ JSON

    /** {@code dump_state}'s layout as a JSON value: {@code {"v":1,"u":user,"r":{rule id: [...]}}}. */
    Map<String, Object> dumpJson() {
        Map<String, Object> r = new LinkedHashMap<>();
        for (Map.Entry<String, RuleState> e : rules.entrySet()) {
            RuleState rs = e.getValue();
            List<Object> item = new ArrayList<>();
            if (rs instanceof Count) {
                item.add("c");
                item.add(rs.fingerprint);
                Map<String, Object> groups = new LinkedHashMap<>();
                for (Map.Entry<String, Group> ge : ((Count) rs).groups.entrySet()) {
                    Group g = ge.getValue();
                    List<Object> hits = new ArrayList<>();
                    for (int i = 0; i < g.hitTs.length; i++) {
                        hits.add(List.of(g.hitTs[i], g.hitIds[i]));
                    }
                    List<Object> gv = new ArrayList<>();
                    gv.add(g.maxTs);
                    gv.add(opt(g.lastFired));
                    gv.add(hits);
                    groups.put(ge.getKey(), gv);
                }
                item.add(groups);
            } else if (rs instanceof Sequence) {
                Sequence s = (Sequence) rs;
                item.add("s");
                item.add(rs.fingerprint);
                item.add(opt(s.pendingMs));
                item.add(s.pendingMessageId);
                item.add(opt(s.lastFired));
            } else {
                Returning ret = (Returning) rs;
                item.add("r");
                item.add(rs.fingerprint);
                item.add(opt(ret.lastSeen));
                item.add(opt(ret.lastFired));
            }
            r.put(e.getKey(), item);
        }
        Map<String, Object> doc = new LinkedHashMap<>();
        doc.put("v", 1L);
        doc.put("u", userKey);
        doc.put("r", r);
        return doc;
    }

    private static Long opt(long v) {
        return v == NONE ? null : v;
    }
}
