package dev.clickpulse.operators.sessions;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.UncheckedIOException;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonFactory;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonGenerator;

/**
 * JSON of the ``sessions`` records (``udfs.sessions.session_value``: the same fields in the same order)
 * and of a key's state in ``udfs.sessions.dump_state``'s layout (for the differential test).
 */
public final class SessionJson {
    /** A session with at most one page view, no order and shorter than this is a bounce. */
    static final long ENGAGED_AFTER_MS = 10_000;

    private final JsonFactory factory;
    private final ByteArrayOutputStream buffer = new ByteArrayOutputStream(1024);

    public SessionJson(JsonFactory factory) {
        this.factory = factory;
    }

    /** The value bytes of a ``sessions`` record. */
    public byte[] record(SessionRecord r) {
        buffer.reset();
        try (JsonGenerator g = factory.createGenerator(buffer)) {
            Session s = r.session;
            long durationMs = s.endMs - s.startMs;
            Touch entry = s.entry;
            g.writeStartObject();
            g.writeStringField("session_id", r.sessionId);
            g.writeStringField("user_key", r.userKey);
            str(g, "anonymous_id", entry.anonymousId);
            g.writeStringField("start", formatMs(s.startMs));
            g.writeStringField("end", formatMs(s.endMs));
            g.writeNumberField("start_ms", s.startMs);
            g.writeNumberField("end_ms", s.endMs);
            g.writeNumberField("duration_s", durationMs / 1000.0);
            g.writeNumberField("events", s.events);
            g.writeNumberField("page_views", s.pageViews);
            str(g, "entry_page", entry.pagePath);
            str(g, "exit_page", s.exit.pagePath);
            str(g, "utm_source", entry.utmSource);
            str(g, "utm_medium", entry.utmMedium);
            str(g, "utm_campaign", entry.utmCampaign);
            str(g, "utm_term", entry.utmTerm);
            str(g, "utm_content", entry.utmContent);
            str(g, "referrer_type", entry.referrerType);
            str(g, "country", entry.country);
            str(g, "device_type", entry.deviceType);
            g.writeBooleanField("is_bounce", s.pageViews <= 1 && s.orders == 0 && durationMs < ENGAGED_AFTER_MS);
            g.writeBooleanField("converted", s.orders > 0);
            g.writeNumberField("orders", s.orders);
            g.writeNumberField("revenue", s.revenueMicros / 1_000_000.0);
            str(g, "currency", s.currency);
            g.writeNumberField("version", r.version);
            g.writeBooleanField("retracted", r.retracted);
            str(g, "superseded_by", r.supersededBy);
            g.writeEndObject();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return buffer.toByteArray();
    }

    /** ``dump_state``'s JSON: ``[1, user_key, max_ts, [timers], [session, ...]]``; ``null`` when empty. */
    public byte[] state(KeyState st) {
        if (st.isEmpty()) {
            return null;
        }
        buffer.reset();
        try (JsonGenerator g = factory.createGenerator(buffer)) {
            g.writeStartArray();
            g.writeNumber(1);
            g.writeString(st.userKey);
            if (st.maxTs == null) {
                g.writeNull();
            } else {
                g.writeNumber(st.maxTs);
            }
            g.writeStartArray();
            for (long t : st.timers) {
                g.writeNumber(t);
            }
            g.writeEndArray();
            g.writeStartArray();
            for (Session s : st.sessions) {
                g.writeStartArray();
                g.writeNumber(s.startMs);
                g.writeNumber(s.endMs);
                g.writeString(s.firstId);
                g.writeNumber(s.events);
                g.writeNumber(s.pageViews);
                g.writeNumber(s.orders);
                g.writeNumber(s.revenueMicros);
                g.writeString(s.currency);
                touch(g, s.entry, false);
                touch(g, s.exit, true);
                g.writeString(s.publishedId);
                g.writeNumber(s.publishedVersion);
                g.writeEndArray();
            }
            g.writeEndArray();
            g.writeEndArray();
        } catch (IOException e) {
            throw new UncheckedIOException(e);
        }
        return buffer.toByteArray();
    }

    private static void touch(JsonGenerator g, Touch t, boolean exitOnly) throws IOException {
        g.writeStartArray();
        g.writeNumber(t.rank);
        g.writeNumber(t.tsMs);
        g.writeString(t.messageId);
        g.writeString(t.pagePath);
        if (!exitOnly) {
            for (String v : new String[] {t.anonymousId, t.utmSource, t.utmMedium, t.utmCampaign, t.utmTerm,
                    t.utmContent, t.referrerType, t.country, t.deviceType}) {
                g.writeString(v);
            }
        }
        g.writeEndArray();
    }

    private static void str(JsonGenerator g, String name, String value) throws IOException {
        if (value == null) {
            g.writeNullField(name);
        } else {
            g.writeStringField(name, value);
        }
    }

    /** UTC epoch ms as ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (``udfs.timeutil.format_ms``). */
    public static String formatMs(long ms) {
        long seconds = Math.floorDiv(ms, 1000L);
        int millis = (int) Math.floorMod(ms, 1000L);
        long days = Math.floorDiv(seconds, 86_400L);
        int secOfDay = (int) Math.floorMod(seconds, 86_400L);
        java.time.LocalDate date = java.time.LocalDate.ofEpochDay(days);
        char[] out = new char[24];
        put(out, 0, date.getYear(), 4);
        out[4] = '-';
        put(out, 5, date.getMonthValue(), 2);
        out[7] = '-';
        put(out, 8, date.getDayOfMonth(), 2);
        out[10] = 'T';
        put(out, 11, secOfDay / 3600, 2);
        out[13] = ':';
        put(out, 14, secOfDay / 60 % 60, 2);
        out[16] = ':';
        put(out, 17, secOfDay % 60, 2);
        out[19] = '.';
        put(out, 20, millis, 3);
        out[23] = 'Z';
        return new String(out);
    }

    private static void put(char[] out, int at, int value, int width) {
        for (int i = at + width - 1; i >= at; i--) {
            out[i] = (char) ('0' + value % 10);
            value /= 10;
        }
    }
}
