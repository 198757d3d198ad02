using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Speculative;

namespace CoordGen.Actors.Device;

/// <summary>
/// The calibrator (paper §3.3) on its own thread: it gathers the top-k next tokens of every prompt
/// position from copies of the prefill chunks' top-k rows while the device computes the next chunks (or
/// other sessions' steps), and at the end of the prefill builds the calibrated index and hands it
/// back. The session starts decoding without waiting for it; calibrated drafts join from the next
/// step after the index arrives. A failure here degrades that session to the other draft sources.
/// </summary>
public sealed class CalibratorActor : ReceiveActor
{
    /// <summary>Per session being calibrated: the top-k read so far (null once a chunk failed) and the time spent.</summary>
    private readonly Dictionary<object, (PrefillTopK? TopK, double Ms)> _open = [];

    /// <summary>Per session whose index is being built in slices.</summary>
    private readonly Dictionary<object, Building> _building = [];

    /// <summary>Work per slice of a shared build, and the pause after it.</summary>
    private const double SliceMs = 1.0;

    private const int PauseMs = 2;

    public CalibratorActor()
    {
        Receive<CalibrateChunk>(c =>
        {
            long t0 = Stopwatch.GetTimestamp();
            if (!_open.TryGetValue(c.Key, out var state))
            {
                state = (new PrefillTopK(c.Options.TopK), 0);
            }

            try
            {
                state.TopK?.Add(c.Rows);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                state.TopK = null; // Finish reports the failure; the session drafts without calibration
            }

            _open[c.Key] = (state.TopK, state.Ms + Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
        });
        Receive<CalibrateFinish>(f =>
        {
            long t0 = Stopwatch.GetTimestamp();
            bool open = _open.Remove(f.Key, out var state);
            var job = new Building(f, Sender, state.Ms, DateTimeOffset.UtcNow);
            if (!open || state.TopK is not { } topK)
            {
                Reply(job, null, null);
                return;
            }

            try
            {
                job.Builder = new CalibratedIndex.Builder(f.Prompt, topK, f.Options);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                Reply(job, null, ex);
                return;
            }

            job.Ms += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            _building[f.Key] = job;
            Continue(f.Key);
        });
        Receive<ContinueBuilding>(c => Continue(c.Key));
        Receive<CalibrateCancel>(c =>
        {
            _open.Remove(c.Key);
            _building.Remove(c.Key);
        });
    }

    /// <summary>
    /// Work on one session's index for a slice, then pause before the next if others' steps are running
    /// (<see cref="CalibrateFinish.Share"/>): the device's threads use every core, and a long build beside
    /// them stretched their steps (a 1,500-token prompt's index: about 14 ms of work, which doubled the
    /// steps it overlapped). Slices keep each step's share of it small.
    /// </summary>
    private void Continue(object key)
    {
        if (!_building.TryGetValue(key, out var job))
        {
            return; // cancelled meanwhile
        }

        long t0 = Stopwatch.GetTimestamp();
        bool done;
        try
        {
            // Whole when alone; else slices of about SliceMs, checked every few positions.
            done = !job.Finish.Share ? job.Builder!.Advance(int.MaxValue) : AdvanceFor(job.Builder!, SliceMs);
        }
        catch (Exception ex) when (ex is not OutOfMemoryException)
        {
            _building.Remove(key);
            Reply(job, null, ex);
            return;
        }

        job.Ms += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
        job.Slices++;
        if (done)
        {
            _building.Remove(key);
            Reply(job, job.Builder!.Result(), null);
            return;
        }

        var self = Self;
        Task.Delay(PauseMs).ContinueWith(_ => self.Tell(new ContinueBuilding(key)), TaskScheduler.Default);
    }

    private static bool AdvanceFor(CalibratedIndex.Builder builder, double ms)
    {
        long t0 = Stopwatch.GetTimestamp();
        while (!builder.Advance(16))
        {
            if (Stopwatch.GetElapsedTime(t0).TotalMilliseconds >= ms)
            {
                return false;
            }
        }

        return true;
    }

    private static void Reply(Building job, CalibratedIndex? index, Exception? error)
    {
        var f = job.Finish;
        using var span = Telemetry.Source.StartActivity("coordgen.calibrate", ActivityKind.Internal, f.Trace, startTime: job.Started);
        if (error is not null)
        {
            span?.SetStatus(ActivityStatusCode.Error, error.Message);
        }

        span?.SetTag("coordgen.session", f.SessionId);
        span?.SetTag("coordgen.calibrated_paths", index?.Paths ?? 0);
        span?.SetTag("coordgen.context_tokens", f.Prompt.Length);
        span?.SetTag("coordgen.calibrate_slices", job.Slices);
        job.ReplyTo.Tell(new Calibrated(f.Key, index, job.Ms));
    }

    /// <summary>One session's index being built: the request, who to answer, the builder, the calibrator's time so far.</summary>
    private sealed class Building(CalibrateFinish finish, IActorRef replyTo, double ms, DateTimeOffset started)
    {
        public CalibrateFinish Finish { get; } = finish;

        public IActorRef ReplyTo { get; } = replyTo;

        public DateTimeOffset Started { get; } = started;

        public CalibratedIndex.Builder? Builder { get; set; }

        public double Ms { get; set; } = ms;

        public int Slices { get; set; }
    }

    private sealed record ContinueBuilding(object Key);

    public static Props Props() => Akka.Actor.Props.Create(() => new CalibratorActor());
}

/// <summary>Device → calibrator: the top-k rows of one prefill chunk (a copy the calibrator owns), in order.</summary>
public sealed record CalibrateChunk(object Key, TopRows Rows, CalibrationOptions Options);

/// <summary>Device → calibrator: the prefill of <paramref name="Prompt"/> is done; build its calibrated index.</summary>
public sealed record CalibrateFinish(object Key, string SessionId, int[] Prompt, CalibrationOptions Options, ActivityContext Trace = default)
{
    /// <summary>Other sessions are decoding: build in short slices with pauses, so their steps keep the cores.</summary>
    public bool Share { get; init; }
}

/// <summary>Device → calibrator: the session is gone; drop what was read for it.</summary>
public sealed record CalibrateCancel(object Key);

/// <summary>Calibrator → device: the calibrated index (null when calibration failed) and the calibrator's time on it.</summary>
public sealed record Calibrated(object Key, CalibratedIndex? Index, double Ms);
