//! Communication for meshflow: transports, wire frames, collectives.
