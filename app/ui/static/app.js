// The run page, live: follows the run's events and keeps the server-rendered page current.
// No library and no inline script (the Content-Security-Policy forbids it). Text from events
// goes in through textContent only; fresh sections come as HTML our server rendered and escaped.
'use strict';

(function () {
  const root = document.getElementById('run');
  if (!root || root.dataset.live !== 'on' || !window.EventSource) {
    return; // not a run page, or a finished run: the page is already complete
  }
  const runId = root.dataset.runId;
  const announcer = document.getElementById('live-status');
  // A step never goes back: an event older than what the page shows is ignored (the page's
  // steps may be read a moment after its `data-after`).
  const RANK = { pending: 0, queued: 0, running: 1, completed: 2, failed: 2 };
  const STEP_EVENTS = ['step_started', 'step_attempt_failed', 'step_completed', 'step_failed'];
  const RUN_EVENTS = ['run_completed', 'run_failed'];
  const REFRESH_AFTER = new Set(['step_completed', 'step_failed', ...RUN_EVENTS]);
  // The newest event per step (and for the run), re-applied over each fresh copy of the
  // sections: one rendered just before an event was committed must not undo it.
  const latest = new Map();
  let runEvent = null;
  let refreshing = false;
  let refreshAgain = false;

  function statusText(status) {
    const words = status.replace(/_/g, ' ');
    return words.charAt(0).toUpperCase() + words.slice(1);
  }

  function setBadge(container, status) {
    const badge = container && container.querySelector('.badge');
    if (badge) {
      badge.textContent = statusText(status);
      badge.className = 'badge badge--' + status;
    }
  }

  // Shows a step event on its row; false when it tells nothing the row does not show already
  // (the page's steps may be a moment newer than the event it asked to start after).
  function applyStep(data) {
    const row = root.querySelector('tr[data-step="' + CSS.escape(data.step_name) + '"]');
    if (!row || RANK[data.status] < RANK[row.dataset.status]) {
      return false;
    }
    const attempts = row.querySelector('[data-role="attempts"]');
    const error = row.querySelector('[data-role="error"]');
    const newAttempt = typeof data.attempt === 'number' && data.attempt > Number(attempts.textContent);
    const errorText = data.error_message ? 'Error: ' + data.error_message : null;
    const newError = errorText !== null && errorText !== error.textContent;
    if (data.status === row.dataset.status && !newAttempt && !newError) {
      return false;
    }
    row.dataset.status = data.status;
    row.className = 'step step--' + data.status;
    setBadge(row.querySelector('[data-role="status"]'), data.status);
    if (newAttempt) {
      attempts.textContent = String(data.attempt);
    }
    if (newError) {
      error.textContent = errorText;
      error.hidden = false;
    }
    const runStatus = root.querySelector('[data-role="run-status"]');
    if (runStatus && runStatus.textContent.trim() === 'Queued') {
      setBadge(runStatus, 'running');
    }
    return true;
  }

  function applyRun(data) {
    setBadge(root.querySelector('[data-role="run-status"]'), data.event === 'run_completed' ? 'completed' : 'failed');
  }

  function describe(type, data) {
    const row = root.querySelector('tr[data-step="' + CSS.escape(data.step_name || '') + '"]');
    const step = row ? row.dataset.label : data.step_name;
    switch (type) {
      case 'step_started':
        return step + ': running' + (data.attempt > 1 ? ' (attempt ' + data.attempt + ')' : '');
      case 'step_attempt_failed':
        return step + ': attempt ' + data.attempt + ' failed, retrying';
      case 'step_completed':
        return step + ': completed';
      case 'step_failed':
        return step + ': failed';
      case 'run_completed':
        return 'Run completed: ' + data.decision_label + ' (confidence ' +
          Number(data.overall_weighted_confidence).toFixed(2) + ')';
      default:
        return 'Run failed: ' + (data.error_message || 'no reason recorded');
    }
  }

  async function refresh() {
    if (refreshing) {
      refreshAgain = true;
      return;
    }
    refreshing = true;
    try {
      do {
        refreshAgain = false;
        const response = await fetch('/runs/' + encodeURIComponent(runId) + '/sections', {
          headers: { Accept: 'text/html' },
          credentials: 'same-origin',
          cache: 'no-store',
        });
        if (!response.ok) {
          break;
        }
        const fresh = new DOMParser().parseFromString(await response.text(), 'text/html');
        root.replaceChildren(...fresh.body.childNodes);
        latest.forEach(applyStep);
        if (runEvent) {
          applyRun(runEvent);
        }
      } while (refreshAgain);
    } catch (error) {
      // Offline for a moment: the page keeps what the events showed; the next event retries.
      console.warn('could not refresh the run sections', error);
    } finally {
      refreshing = false;
    }
  }

  // From the last event the page was rendered with; on reconnects EventSource sends
  // Last-Event-ID itself, which the server prefers.
  const source = new EventSource('/runs/' + encodeURIComponent(runId) + '/events?after=' +
    encodeURIComponent(root.dataset.after || '0'));

  // `handle` answers whether the event changed the page; only then is it announced.
  function listen(type, handle) {
    source.addEventListener(type, function (event) {
      const data = JSON.parse(event.data);
      if (!handle(data)) {
        return;
      }
      announcer.textContent = describe(type, data);
      if (REFRESH_AFTER.has(type)) {
        refresh();
      }
    });
  }

  STEP_EVENTS.forEach(function (type) {
    listen(type, function (data) {
      if (!applyStep(data)) {
        return false;
      }
      latest.set(data.step_name, data);
      return true;
    });
  });
  RUN_EVENTS.forEach(function (type) {
    listen(type, function (data) {
      runEvent = data;
      applyRun(data);
      source.close(); // the server ends the stream here; do not reconnect
      root.dataset.live = 'off';
      return true;
    });
  });
  source.addEventListener('error', function () {
    // CLOSED: the server answered 204 (the run finished before we connected) or refused us;
    // show the final state once. Otherwise EventSource reconnects with Last-Event-ID itself.
    if (source.readyState === EventSource.CLOSED && root.dataset.live === 'on') {
      root.dataset.live = 'off';
      refresh();
    }
  });
})();
