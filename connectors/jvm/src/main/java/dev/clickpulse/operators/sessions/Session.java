package dev.clickpulse.operators.sessions;

/**
 * One session's aggregates (``udfs.sessions.Session``); immutable. ``firstId`` is the message_id of its
 * first event (earliest, ties by id); ``publishedId``/``publishedVersion`` tell what was last sent for it
 * (null/0: nothing yet).
 */
public final class Session {
    final long startMs;
    final long endMs;
    final String firstId;
    final long events;
    final long pageViews;
    final long orders;
    final long revenueMicros;
    final String currency;
    final Touch entry;
    final Touch exit;
    final String publishedId;
    final long publishedVersion;

    Session(long startMs, long endMs, String firstId, long events, long pageViews, long orders,
            long revenueMicros, String currency, Touch entry, Touch exit, String publishedId,
            long publishedVersion) {
        this.startMs = startMs;
        this.endMs = endMs;
        this.firstId = firstId;
        this.events = events;
        this.pageViews = pageViews;
        this.orders = orders;
        this.revenueMicros = revenueMicros;
        this.currency = currency;
        this.entry = entry;
        this.exit = exit;
        this.publishedId = publishedId;
        this.publishedVersion = publishedVersion;
    }

    /** A session of one event. */
    static Session of(SessionEvent ev) {
        return new Session(ev.tsMs, ev.tsMs, ev.messageId, 1, ev.isPage ? 1 : 0, ev.isOrder ? 1 : 0,
                ev.revenueMicros, ev.currency, ev.touch, ev.exitMark, null, 0);
    }

    /** True when (ts, id) sorts before (ts2, id2). */
    static boolean before(long ts, String id, long ts2, String id2) {
        return ts < ts2 || (ts == ts2 && Touch.compareCodePoints(id, id2) < 0);
    }

    /** Aggregates of both sessions; publication bookkeeping of this one (the survivor). */
    Session merge(Session other) {
        boolean mine = !before(other.startMs, other.firstId, startMs, firstId); // (self) <= (other)
        return new Session(
                mine ? startMs : other.startMs,
                Math.max(endMs, other.endMs),
                mine ? firstId : other.firstId,
                events + other.events,
                pageViews + other.pageViews,
                orders + other.orders,
                revenueMicros + other.revenueMicros,
                SessionReducer.currency(currency, other.currency),
                Touch.compareEntry(entry, other.entry) <= 0 ? entry : other.entry,
                Touch.compareExit(exit, other.exit) >= 0 ? exit : other.exit,
                publishedId,
                publishedVersion);
    }

    /** This session with one more event. */
    Session add(SessionEvent ev) {
        long start = startMs;
        String first = firstId;
        if (before(ev.tsMs, ev.messageId, start, first)) {
            start = ev.tsMs;
            first = ev.messageId;
        }
        Touch t = ev.touch;
        return new Session(
                start,
                Math.max(endMs, ev.tsMs),
                first,
                events + 1,
                pageViews + (ev.isPage ? 1 : 0),
                orders + (ev.isOrder ? 1 : 0),
                revenueMicros + ev.revenueMicros,
                SessionReducer.currency(currency, ev.currency),
                Touch.compareEntry(t, entry) < 0 ? t : entry,
                Touch.compareExit(t, exit) > 0 ? ev.exitMark : exit,
                publishedId,
                publishedVersion);
    }

    /** This session as published under ``id`` with version ``version``. */
    Session published(String id, long version) {
        return new Session(startMs, endMs, firstId, events, pageViews, orders, revenueMicros, currency, entry,
                exit, id, version);
    }
}
