package dev.clickpulse.operators.sessions;

import java.io.ByteArrayOutputStream;
import java.io.DataOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import java.nio.ByteBuffer;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

/**
 * Binary form of a {@link KeyState} for Flink keyed state (``BYTES``): a format version byte, then the
 * fields in ``dump_state``'s order. Changing it is a state-schema change: bump {@link #VERSION}, read the
 * old one, note it in CHANGELOG.md.
 */
public final class StateCodec {
    static final byte VERSION = 1;

    private final ByteArrayOutputStream buffer = new ByteArrayOutputStream(512);

    public byte[] encode(KeyState st) {
        buffer.reset();
        try (DataOutputStream out = new DataOutputStream(buffer)) {
            out.writeByte(VERSION);
            str(out, st.userKey);
            out.writeBoolean(st.maxTs != null);
            if (st.maxTs != null) {
                out.writeLong(st.maxTs);
            }
            out.writeInt(st.timers.length);
            for (long t : st.timers) {
                out.writeLong(t);
            }
            out.writeInt(st.sessions.size());
            for (Session s : st.sessions) {
                out.writeLong(s.startMs);
                out.writeLong(s.endMs);
                str(out, s.firstId);
                out.writeLong(s.events);
                out.writeLong(s.pageViews);
                out.writeLong(s.orders);
                out.writeLong(s.revenueMicros);
                str(out, s.currency);
                touch(out, s.entry, false);
                touch(out, s.exit, true);
                str(out, s.publishedId);
                out.writeLong(s.publishedVersion);
            }
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return buffer.toByteArray();
    }

    public static KeyState decode(byte[] data) {
        if (data == null || data.length == 0) {
            return KeyState.EMPTY;
        }
        {
            ByteBuffer in = ByteBuffer.wrap(data);
            byte version = in.get();
            if (version != VERSION) {
                throw new IllegalStateException("unsupported session state version " + version);
            }
            String userKey = str(in);
            Long maxTs = in.get() != 0 ? in.getLong() : null;
            long[] timers = new long[in.getInt()];
            for (int i = 0; i < timers.length; i++) {
                timers[i] = in.getLong();
            }
            int n = in.getInt();
            List<Session> sessions = new ArrayList<>(n);
            for (int i = 0; i < n; i++) {
                sessions.add(new Session(in.getLong(), in.getLong(), str(in), in.getLong(), in.getLong(),
                        in.getLong(), in.getLong(), str(in), touch(in, false), touch(in, true), str(in),
                        in.getLong()));
            }
            return new KeyState(userKey, Collections.unmodifiableList(sessions), maxTs, timers);
        }
    }

    private static void touch(DataOutputStream out, Touch t, boolean exitOnly) throws IOException {
        out.writeByte(t.rank);
        out.writeLong(t.tsMs);
        str(out, t.messageId);
        str(out, t.pagePath);
        if (!exitOnly) {
            for (String v : new String[] {t.anonymousId, t.utmSource, t.utmMedium, t.utmCampaign, t.utmTerm,
                    t.utmContent, t.referrerType, t.country, t.deviceType}) {
                str(out, v);
            }
        }
    }

    private static Touch touch(ByteBuffer in, boolean exitOnly) {
        int rank = in.get();
        long ts = in.getLong();
        String mid = str(in);
        String page = str(in);
        if (exitOnly) {
            return new Touch(rank, ts, mid, page, null, null, null, null, null, null, null, null, null);
        }
        return new Touch(rank, ts, mid, page, str(in), str(in), str(in), str(in), str(in), str(in), str(in),
                str(in), str(in));
    }

    private static void str(DataOutputStream out, String s) throws IOException {
        if (s == null) {
            out.writeInt(-1);
            return;
        }
        byte[] b = s.getBytes(StandardCharsets.UTF_8);
        out.writeInt(b.length);
        out.write(b);
    }

    private static String str(ByteBuffer in) {
        int n = in.getInt();
        if (n < 0) {
            return null;
        }
        String s = new String(in.array(), in.arrayOffset() + in.position(), n, StandardCharsets.UTF_8);
        in.position(in.position() + n);
        return s;
    }
}
