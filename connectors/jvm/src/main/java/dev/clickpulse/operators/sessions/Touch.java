package dev.clickpulse.operators.sessions;

import dev.clickpulse.operators.common.OperatorSupport;
/**
 * What one event tells about where a session entered or exited (``udfs.sessions.Touch``).
 *
 * <p>``rank`` is 1 for events with a page and 0 for events without one: the landing is the earliest event
 * with a page, the exit the latest one. Strings are compared by code point, as Python compares them.
 */
public final class Touch {
    final int rank;
    final long tsMs;
    final String messageId;
    final String pagePath;
    final String anonymousId;
    final String utmSource;
    final String utmMedium;
    final String utmCampaign;
    final String utmTerm;
    final String utmContent;
    final String referrerType;
    final String country;
    final String deviceType;

    Touch(int rank, long tsMs, String messageId, String pagePath, String anonymousId, String utmSource,
            String utmMedium, String utmCampaign, String utmTerm, String utmContent, String referrerType,
            String country, String deviceType) {
        this.rank = rank;
        this.tsMs = tsMs;
        this.messageId = messageId;
        this.pagePath = pagePath;
        this.anonymousId = anonymousId;
        this.utmSource = utmSource;
        this.utmMedium = utmMedium;
        this.utmCampaign = utmCampaign;
        this.utmTerm = utmTerm;
        this.utmContent = utmContent;
        this.referrerType = referrerType;
        this.country = country;
        this.deviceType = deviceType;
    }

    /** The exit mark of an event: only rank, time, message_id and page_path. */
    Touch exitMark() {
        return new Touch(rank, tsMs, messageId, pagePath, null, null, null, null, null, null, null, null, null);
    }

    /** Compares ``entry_key()``s: negative when ``a`` is the better landing ((-rank, ts, id) smaller). */
    static int compareEntry(Touch a, Touch b) {
        int c = Integer.compare(-a.rank, -b.rank);
        if (c != 0) {
            return c;
        }
        c = Long.compare(a.tsMs, b.tsMs);
        return c != 0 ? c : compareCodePoints(a.messageId, b.messageId);
    }

    /** Compares ``exit_key()``s: positive when ``a`` is the better exit ((rank, ts, id) larger). */
    static int compareExit(Touch a, Touch b) {
        int c = Integer.compare(a.rank, b.rank);
        if (c != 0) {
            return c;
        }
        c = Long.compare(a.tsMs, b.tsMs);
        return c != 0 ? c : compareCodePoints(a.messageId, b.messageId);
    }

    /** Python's ``str`` order (code points), which differs from ``String.compareTo`` (UTF-16 units). */
    static int compareCodePoints(String a, String b) {
        return OperatorSupport.compareCodePoints(a, b);
    }
}
