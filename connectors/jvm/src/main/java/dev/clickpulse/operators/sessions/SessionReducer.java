package dev.clickpulse.operators.sessions;

import java.nio.charset.StandardCharsets;
import java.security.MessageDigest;
import java.security.NoSuchAlgorithmException;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Collections;
import java.util.List;

/**
 * The session reducer of ``udfs/sessions.py`` (the specification), step for step: {@link #step} applies
 * one event, {@link #onTimer} a fired event-time timer. Pure: no Flink, no clock; the differential test
 * (``tests/job/test_sessions_differential.py``) runs both implementations on generated histories and
 * requires identical records, late events and final states.
 */
public final class SessionReducer {
    /** ``currency`` of a session whose orders used different currencies. */
    static final String MIXED_CURRENCY = "MIXED";

    private static final long[] NO_TIMERS = new long[0];

    private SessionReducer() {}

    /** Currency of a session's orders: the one currency, or ``MIXED`` (order-independent). */
    static String currency(String a, String b) {
        if (a == null || a.equals(b)) {
            return a == null ? b : a;
        }
        return b == null ? a : MIXED_CURRENCY;
    }

    private static final ThreadLocal<MessageDigest> SHA256 = ThreadLocal.withInitial(() -> {
        try {
            return MessageDigest.getInstance("SHA-256");
        } catch (NoSuchAlgorithmException e) {
            throw new IllegalStateException(e);
        }
    });

    private static final char[] HEX = "0123456789abcdef".toCharArray();

    /** Deterministic session id: 32 hex chars of sha256 over user_key, 0x1f, the first message_id. */
    public static String sessionIdFor(String userKey, String firstMessageId) {
        MessageDigest sha = SHA256.get();
        sha.update(userKey.getBytes(StandardCharsets.UTF_8));
        sha.update((byte) 0x1f);
        byte[] digest = sha.digest(firstMessageId.getBytes(StandardCharsets.UTF_8));
        char[] out = new char[32];
        for (int i = 0; i < 16; i++) {
            out[2 * i] = HEX[(digest[i] >> 4) & 0xf];
            out[2 * i + 1] = HEX[digest[i] & 0xf];
        }
        return new String(out);
    }

    private static SessionRecord retraction(String userKey, Session old, String supersededBy) {
        return new SessionRecord(userKey, old, old.publishedId, old.publishedVersion + 1, true, supersededBy);
    }

    /** When the session next needs the timer: its close (until published), then its purge. */
    private static long due(Session s, SessionConfig cfg) {
        long close = s.endMs + cfg.gapMs;
        return s.publishedVersion == 0 ? close : close + cfg.allowedLatenessMs;
    }

    /** ``{pending timers, timers to register}``: one new timer only if none fires by the next due time. */
    private static long[][] schedule(List<Session> sessions, long[] pending, SessionConfig cfg) {
        if (sessions.isEmpty()) {
            return new long[][] {pending, NO_TIMERS};
        }
        long due = Long.MAX_VALUE;
        for (Session s : sessions) {
            due = Math.min(due, due(s, cfg));
        }
        for (long t : pending) {
            if (t <= due) {
                return new long[][] {pending, NO_TIMERS};
            }
        }
        long[] next = Arrays.copyOf(pending, pending.length + 1);
        next[pending.length] = due;
        Arrays.sort(next);
        return new long[][] {next, new long[] {due}};
    }

    /** Apply one event; ``watermarkMs`` is the operator's current event-time watermark. */
    public static StepResult step(KeyState state, SessionEvent ev, long watermarkMs, SessionConfig cfg) {
        String userKey = ev.userKey;
        long ts = ev.tsMs;
        // the per-key bound is what a bounded-out-of-orderness watermark over this key alone would be
        long keyBound = state.maxTs != null ? state.maxTs - cfg.outOfOrdernessMs - 1 : watermarkMs;
        long effectiveWm = Math.max(watermarkMs, keyBound);
        if (ts + cfg.allowedLatenessMs <= effectiveWm) {
            List<Emit> late = Collections.singletonList(new LateEvent(ev.messageId, userKey, ts, effectiveWm));
            return new StepResult(state, late, NO_TIMERS, new Counts(0, 0, 0, 0, 0, 1, 0, 0));
        }

        List<Session> sessions = new ArrayList<>(state.sessions);
        int i = -1; // last session starting at or before ts
        for (int j = 0; j < sessions.size() && sessions.get(j).startMs <= ts; j++) {
            i = j;
        }
        List<Emit> emits = new ArrayList<>(2);
        int opened = 0;
        int merged = 0;
        int idx;
        Session old;
        Session changed;
        Session absorbed = null;
        if (i >= 0 && ts <= sessions.get(i).endMs) {
            idx = i;
            old = sessions.get(i);
            changed = old.add(ev);
        } else {
            Session prev = i >= 0 ? sessions.get(i) : null;
            Session nxt = i + 1 < sessions.size() ? sessions.get(i + 1) : null;
            boolean joinPrev = prev != null && ts - prev.endMs < cfg.gapMs && ts - prev.startMs < cfg.maxMs;
            boolean joinNext = nxt != null && nxt.startMs - ts < cfg.gapMs && nxt.endMs - ts < cfg.maxMs;
            if (joinPrev) {
                idx = i;
                old = prev;
                changed = prev.add(ev);
                if (joinNext && nxt.endMs - changed.startMs < cfg.maxMs) {
                    // the event bridges two sessions: the earlier one survives
                    absorbed = nxt;
                    changed = changed.merge(nxt);
                    sessions.remove(i + 1);
                    merged = 1;
                }
            } else if (joinNext) {
                idx = i + 1;
                old = nxt;
                changed = nxt.add(ev);
            } else {
                idx = i + 1;
                old = null;
                changed = Session.of(ev);
                sessions.add(idx, changed);
                opened = 1;
            }
        }

        int closed = 0;
        int updated = 0;
        int retracted = 0;
        String newSid = sessionIdFor(userKey, changed.firstId);
        // every session whose published record no longer stands under its id gets a retraction
        boolean hadPublication = false;
        for (Session before : new Session[] {old, absorbed}) {
            if (before != null && before.publishedId != null && !before.publishedId.isEmpty()) {
                hadPublication = true;
                if (!before.publishedId.equals(newSid)) {
                    emits.add(retraction(userKey, before, newSid));
                    retracted++;
                }
            }
        }
        // a published session (or one already closed by the watermark) is sent again at once
        if (hadPublication || watermarkMs >= changed.endMs + cfg.gapMs) {
            String sid = sessionIdFor(userKey, changed.firstId);
            changed = changed.published(sid, changed.events);
            emits.add(new SessionRecord(userKey, changed, sid, changed.events, false, null));
            if (hadPublication) {
                updated = 1;
            } else {
                closed = 1;
            }
        }
        sessions.set(idx, changed);
        long[][] sched = schedule(sessions, state.timers, cfg);
        KeyState next = new KeyState(
                userKey,
                Collections.unmodifiableList(sessions),
                state.maxTs == null ? ts : Math.max(state.maxTs, ts),
                sched[0]);
        Counts counts = new Counts(opened, closed, updated, merged, retracted, 0, ts < watermarkMs ? 1 : 0, 0);
        return new StepResult(next, emits, sched[1], counts);
    }

    /**
     * The watermark reached ``timerMs``: publish sessions closed by then, purge expired ones. Flink fires a
     * key's timers in time order, so every pending timer up to ``timerMs`` has fired.
     */
    public static StepResult onTimer(KeyState state, long timerMs, SessionConfig cfg) {
        List<Emit> emits = new ArrayList<>(1);
        List<Session> keep = new ArrayList<>(state.sessions.size());
        int closed = 0;
        int purged = 0;
        for (Session s : state.sessions) {
            long close = s.endMs + cfg.gapMs;
            if (timerMs >= close && s.publishedVersion == 0) {
                String sid = sessionIdFor(state.userKey, s.firstId);
                s = s.published(sid, s.events);
                emits.add(new SessionRecord(state.userKey, s, sid, s.events, false, null));
                closed++;
            }
            if (timerMs >= close + cfg.allowedLatenessMs) {
                purged++;
                continue;
            }
            keep.add(s);
        }
        long[] remaining = Arrays.stream(state.timers).filter(t -> t > timerMs).toArray();
        long[][] sched = schedule(keep, remaining, cfg);
        if (emits.isEmpty() && purged == 0 && state.sameTimers(sched[0])) {
            return new StepResult(state, Collections.emptyList(), NO_TIMERS, Counts.NONE);
        }
        KeyState next = new KeyState(state.userKey, Collections.unmodifiableList(keep), state.maxTs, sched[0]);
        return new StepResult(next, emits, sched[1], new Counts(0, closed, 0, 0, 0, 0, 0, purged));
    }
}
