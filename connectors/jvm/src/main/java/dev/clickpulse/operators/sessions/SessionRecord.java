package dev.clickpulse.operators.sessions;

/**
 * One message for the ``sessions`` topic (key ``sessionId``): the session's content as published, its
 * version and, for a retraction, the id that superseded it. {@link SessionJson#record} renders the value.
 */
public final class SessionRecord implements Emit {
    public final String userKey;
    public final Session session;
    public final String sessionId;
    public final long version;
    public final boolean retracted;
    public final String supersededBy;

    SessionRecord(String userKey, Session session, String sessionId, long version, boolean retracted,
            String supersededBy) {
        this.userKey = userKey;
        this.session = session;
        this.sessionId = sessionId;
        this.version = version;
        this.retracted = retracted;
        this.supersededBy = supersededBy;
    }
}
