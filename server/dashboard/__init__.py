"""The live dashboard of a running server: one page (static files) and a JSON state endpoint.

``dashboard_port`` in the server config turns it on (:class:`server.config.ServerConfig`). It
runs a stdlib :class:`http.server.ThreadingHTTPServer` in a daemon thread, so it needs nothing
beyond the server itself and the page works offline (its own CSS and JavaScript, no CDN):

* ``/`` (also ``/index.html``), ``/dashboard.css``, ``/dashboard.js``: the page, its stylesheet
  and its script, the package's files in ``server/dashboard/static/`` (:mod:`server.pages`;
  any other path is 404). The page polls ``/api/state`` every second and shows the fleet
  (device class, online/offline, battery, temperature, budget and what limited it, the last
  round it trained, experts and bytes it sent, its median step time, whether it is eligible or
  why it sits out), the open round's progress and deadline, accuracy, loss and bytes per
  round, and which experts each device trained in the last closed round with how the
  devices' sets overlapped over the recent rounds (:mod:`server.dashboard.selection`).
* ``/api/state``: the latest snapshot as JSON.
* ``/report``: the full HTML report (:func:`server.report.write_report`), written on demand and
  again only when a round finished since.

Thread safety: the HTTP threads never touch the coordinator. The coordinator's own thread
builds a snapshot (plain data, serialized to JSON there) from its hooks -- between pumps while
it waits, at most every 0.5 s (less often when a large fleet makes a snapshot costly), and
always when a round opens or closes -- and the HTTP threads serve the last one under a lock.

With a token (required off loopback, see the config), every request must carry it, as
``?token=...`` or ``Authorization: Bearer ...``; the page passes it on to its own requests.
Only the stylesheet and the script are served without it: they hold no run data, and a browser
cannot add a token to the page's ``<link>`` and ``<script>`` requests.

Rounds are shown as :func:`server.rounds.round_label` numbers them (initial, 1, 2, ...);
``dashboard.js`` maps ``api/state``'s 0-based round indices the same way.

Modules: :mod:`server.dashboard.app` (the :class:`Dashboard` and its snapshots),
:mod:`server.dashboard.selection` (the "Experts trained" panel's part of a snapshot),
:mod:`server.dashboard.handler` (HTTP).
"""

from server.dashboard.app import Dashboard

__all__ = ["Dashboard"]
