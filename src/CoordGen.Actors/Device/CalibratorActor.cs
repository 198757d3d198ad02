using System.Diagnostics;
using Akka.Actor;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;
using static CoordGen.Messages.CalibratorProtocol;

namespace CoordGen.Actors.Device;

/// <summary>
/// The calibrator (paper §3.3) on its own thread: it gathers the top-k next tokens of every prompt
/// position from copies of the prefill chunks' top-k rows while the device computes the next chunks (or
/// other sessions' steps), and at the end of the prefill builds the calibrated index and hands it
/// hands the calibrated paths to the drafter, which indexes them. The session starts decoding without
/// waiting for them; calibrated drafts join from the next step after they arrive. A failure here
/// degrades that session to the other draft sources.
/// </summary>
public sealed class CalibratorActor : ReceiveActor
{
    /// <summary>Per session being calibrated: the top-k read so far (null once a chunk failed) and the time spent.</summary>
    private readonly Dictionary<SessionRun, (PrefillTopK? TopK, double Ms)> _open = [];

    /// <summary>Per session whose index is being built in slices.</summary>
    private readonly Dictionary<SessionRun, Building> _building = [];

    private readonly IActorRef _drafter;

    /// <summary>Work per slice of a shared build, and the pause after it.</summary>
    private const double SliceMs = 1.0;

    private const int PauseMs = 2;

    /// <param name="drafter">Where the calibrated paths go.</param>
    public CalibratorActor(IActorRef drafter)
    {
        _drafter = drafter;
        Receive<Chunk>(c =>
        {
            long t0 = Stopwatch.GetTimestamp();
            if (!_open.TryGetValue(c.Run, out var state))
            {
                state = (new PrefillTopK(c.Rows.K), 0);
            }

            try
            {
                state.TopK?.Add(c.Rows);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                state.TopK = null; // Finish reports the failure; the session drafts without calibration
            }

            _open[c.Run] = (state.TopK, state.Ms + Stopwatch.GetElapsedTime(t0).TotalMilliseconds);
        });
        Receive<Finish>(f =>
        {
            long t0 = Stopwatch.GetTimestamp();
            bool open = _open.Remove(f.Run, out var state);
            var job = new Building(f, state.Ms, DateTimeOffset.UtcNow);
            if (!open || state.TopK is not { } topK)
            {
                Reply(job, null, null);
                return;
            }

            try
            {
                job.Builder = new CalibratedIndex.Builder(f.Prompt, topK, SpeculationOptions.ForMethod(f.Method, f.Width).Calibration);
            }
            catch (Exception ex) when (ex is not OutOfMemoryException)
            {
                Reply(job, null, ex);
                return;
            }

            job.Ms += Stopwatch.GetElapsedTime(t0).TotalMilliseconds;
            _building[f.Run] = job;
            Continue(f.Run);
        });
        Receive<ContinueBuilding>(c => Continue(c.Run));
        Receive<Cancel>(c =>
        {
            _open.Remove(c.Run);
            _building.Remove(c.Run);
        });
    }

    /// <summary>
    /// Work on one session's index for a slice, then pause before the next if others' steps are running
    /// (<see cref="CalibratorProtocol.Finish.Share"/>): the device's threads use every core, and a long build beside
    /// them stretched their steps (a 1,500-token prompt's index: about 14 ms of work, which doubled the
    /// steps it overlapped). Slices keep each step's share of it small.
    /// </summary>
    private void Continue(SessionRun key)
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
            Reply(job, job.Builder!.Paths(), null);
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

    private void Reply(Building job, CalibratedPaths? paths, Exception? error)
    {
        var f = job.Finish;
        using var span = Telemetry.Source.StartActivity("coordgen.calibrate", ActivityKind.Internal, f.Trace, startTime: job.Started);
        if (error is not null)
        {
            span?.SetStatus(ActivityStatusCode.Error, error.Message);
        }

        span?.SetTag("coordgen.session", f.Run.Session.Value);
        span?.SetTag("coordgen.calibrated_paths", paths?.Paths ?? 0);
        span?.SetTag("coordgen.context_tokens", f.Prompt.Length);
        span?.SetTag("coordgen.calibrate_slices", job.Slices);
        _drafter.Tell(new DrafterProtocol.Calibrated(f.Run, paths, job.Ms));
    }

    /// <summary>One session's index being built: the request, the builder, the calibrator's time so far.</summary>
    private sealed class Building(Finish finish, double ms, DateTimeOffset started)
    {
        public Finish Finish { get; } = finish;

        public DateTimeOffset Started { get; } = started;

        public CalibratedIndex.Builder? Builder { get; set; }

        public double Ms { get; set; } = ms;

        public int Slices { get; set; }
    }

    private sealed record ContinueBuilding(SessionRun Run);

    public static Props Props(IActorRef drafter) => Akka.Actor.Props.Create(() => new CalibratorActor(drafter));
}
