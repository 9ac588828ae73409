"""The zero-config mesh (cote's half): discovery, the peer table, and the components
(Requester, Responder, Publisher, Subscriber, Monitor).  ``from transport import
Requester, ...`` is the public way in."""
