using Akka.Actor;
using CoordGen.Engine.Runtime;
using CoordGen.Messages;

namespace CoordGen.Actors.Device;

/// <summary>The device's diagnostics and fault hooks (<see cref="DiagnosticsProtocol"/>), kept apart from its production messages.</summary>
public sealed partial class DeviceActor
{
    private readonly List<IActorRef> _statsAskers = [];

    private void ReceiveDiagnostics()
    {
        Receive<DiagnosticsProtocol.GetQueues>(_ => Sender.Tell(new DiagnosticsProtocol.Queues(_queues.Prefilling.Count, _queues.Decoding.Count, _queues.Waiting.Count)));
        Receive<DiagnosticsProtocol.GetOverlap>(_ => Sender.Tell(_timeline.Snapshot()));
        Receive<DiagnosticsProtocol.GetStepDecisions>(_ => Sender.Tell(_timeline.Decisions()));
        Receive<DiagnosticsProtocol.GetWidthDecisions>(_ => Sender.Tell(_timeline.WidthDecisions()));
        Receive<DiagnosticsProtocol.SetPackedSteps>(p => _packing = p.Packed ? PackingMode.WhenItPays : PackingMode.Off);
        Receive<DiagnosticsProtocol.SetMixedSteps>(p => _mixedSteps = p.Mixed);
        Receive<DiagnosticsProtocol.SetWidthBudget>(p => _widthBudget = p.Budget);
        Receive<DiagnosticsProtocol.SetPrefixCache>(p => _prefix.Set(p.Enabled));
        Receive<DiagnosticsProtocol.GetPrefixCache>(_ =>
        {
            if (_busy)
            {
                _statsAskers.Add(Sender); // answered when the step under way ends
                return;
            }

            Sender.Tell(_prefix.Stats());
        });
        Receive<DiagnosticsProtocol.CrashDevice>(_ => throw new InjectedFaultException(FaultKind.DeviceException, "injected: the device actor crashed"));
    }

    /// <summary>Prefix cache reports asked for while a step ran, answered once it has ended.</summary>
    private void AnswerStatsAskers()
    {
        _statsAskers.ForEach(a => a.Tell(_prefix.Stats()));
        _statsAskers.Clear();
    }
}
