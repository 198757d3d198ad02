using CoordGen.Engine.Generation;
using CoordGen.Engine.Runtime;
using CoordGen.Engine.Speculative;
using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>A run's prefill steps: the first one's checks, the chunks (alone, or with riders in a mixed run), and the start of decoding.</summary>
internal sealed partial class DeviceSession
{
    // A mixed run (decisions 0026, 0029): this run's chunk with other runs' one-token steps or trees. What fails in this run's own part
    // fails this run alone (StepFailure), and the riders still take their step; only the shared run's own failure
    // (a device fault) fails them all, as a packed run's does. A cancelled run's chunk runs for its riders anyway.
    private void StepWithRiders(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix, IChunkRiders riders)
    {
        if (Decoding)
        {
            throw new InvalidOperationException("only a prefill chunk takes riders.");
        }

        try
        {
            OpenPrefill(runtime, plain, spec, prefix);
        }
        catch (Exception ex)
        {
            StepFailure = ex;
            riders.RunPacked();
            return;
        }

        if (_prefill!.Step(runtime, plain, spec, prefix, ChunkWidth, PrefixRoom, riders))
        {
            try
            {
                StartDecoding(plain, spec, stops, prefix);
            }
            catch (Exception ex)
            {
                StepFailure = ex;
            }
        }
    }

    // The first prefill step: the request's options checked, its prefill begun (the prefix cache looked up).
    private void OpenPrefill(OrtModelRuntime runtime, Generator plain, SpeculativeDecoder spec, PrefixCache? prefix)
    {
        if (_prefill is null)
        {
            _sampling.Validate();
            if (Request.MaxTokens < 1)
            {
                throw new ArgumentException($"max tokens must be at least 1 (got {Request.MaxTokens}).");
            }

            _prefill = new SessionPrefill(Id, Request, Speculative ? _options : null, roles);
        }

        _prefill.Open(runtime, plain, spec, prefix, PrefixRoom);
    }

    // The whole prompt is in the cache: decoding starts (plainly, or speculatively with the calibrator told).
    private void StartDecoding(Generator plain, SpeculativeDecoder spec, IReadOnlySet<int> stops, PrefixCache? prefix)
    {
        var r = Request;
        if (!Speculative)
        {
            var (cache, pre) = _prefill!.TakePlain(prefix, PrefixRoom);
            _plain = plain.StartDecode(cache, pre.LastLogits, r.Prompt.Count, pre.ElapsedMs, r.MaxTokens, _sampling, stops, Enqueue, _output.KeepLogprob);
        }
        else
        {
            using var pre = _prefill!.TakeSpeculative(prefix, PrefixRoom);
            _spec = spec.Start(pre, r.MaxTokens, _sampling, stops, _options!, null, Enqueue, adoptCache: true, onLogprobs: _output.KeepLogprob, externalDrafter: true);
            if (pre.CalibrationDeferred)
            {
                roles.Calibrator.Tell(new CalibratorProtocol.Finish(Id, [.. pre.Prompt], r.Method, r.Width, OthersDecoding, r.Trace), roles.Device);
            }
            else if (pre.CalibrationFailed)
            {
                // It failed during the prefill: the drafter goes on without it.
                roles.Calibrator.Tell(new CalibratorProtocol.Cancel(Id), roles.Device);
                roles.Drafter.Tell(new DrafterProtocol.Calibrated(Id, null, 0), roles.Device);
            }
        }
    }
}
