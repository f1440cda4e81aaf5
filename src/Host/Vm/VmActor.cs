using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Memory;
using ActorVmm.Vcpu;
using static ActorVmm.Host.Vm.VmProtocol;

namespace ActorVmm.Host.Vm;

/// <summary>
/// One VM: creates and supervises its vmspace, devices and vcpus, and decides how the VM ends.
/// Devices restart on failure (the default strategy); a vcpu never throws to it (it reports
/// <see cref="VcpuProtocol.Stopped"/>), and a vcpu that dies anyway ends the VM.
/// </summary>
internal sealed class VmActor : ReceiveActor, IWithTimers
{
    private sealed record EndTimeout : INotTraced { public static readonly EndTimeout Instance = new(); }

    private static readonly TimeSpan EndGrace = TimeSpan.FromSeconds(3);

    private readonly VmResources _resources;
    private readonly TaskCompletionSource<Outcome> _ended;
    private readonly List<IActorRef> _vcpus = [];
    private readonly HashSet<int> _started = [];
    private readonly HashSet<int> _haltedForever = [];
    private readonly HashSet<int> _stopped = [];
    private readonly List<IActorRef> _watchers = [];
    private Phase _phase = Phase.Created;
    private Outcome? _outcome;

    public ITimerScheduler Timers { get; set; } = null!;

    public VmActor(VmResources resources, TaskCompletionSource<Outcome> ended)
    {
        _resources = resources;
        _ended = ended;

        Receive<Start>(_ => StartBootVcpu());
        Receive<Pause>(_ =>
        {
            if (_phase != Phase.Running) return;
            _phase = Phase.Paused;
            foreach (var v in _vcpus) v.Tell(VcpuProtocol.Pause.Instance);
        });
        Receive<Resume>(_ =>
        {
            if (_phase != Phase.Paused) return;
            _phase = Phase.Running;
            foreach (var v in _vcpus) v.Tell(VcpuProtocol.Resume.Instance);
        });
        Receive<VmProtocol.Stop>(s => End(new Outcome(OutcomeKind.Stopped, Outcome.StoppedCode, s.Reason)));
        Receive<WatchEnd>(_ =>
        {
            if (_phase == Phase.Ended && _outcome is not null) Sender.Tell(new Ended(_resources.Name, _outcome));
            else _watchers.Add(Sender);
        });
        Receive<GetStatus>(_ => Sender.Tell(new VmProtocol.Status(_resources.Name, _phase, _vcpus.Count, _outcome)));

        Receive<DeviceProtocol.GuestExitRequested>(e =>
            End(new Outcome(OutcomeKind.DebugExit, e.Status, $"guest wrote {e.Status >> 1} to {e.Device}: exit status {e.Status}")));
        Receive<DeviceProtocol.GuestResetRequested>(e =>
            End(new Outcome(OutcomeKind.Reset, Outcome.ResetCode, $"guest requested a reset ({e.Reason})")));

        Receive<VcpuProtocol.VcpuHalted>(h =>
        {
            if (!h.InterruptsDisabled) return;
            _haltedForever.Add(h.VcpuId);
            if (_started.IsSubsetOf(_haltedForever))
                End(new Outcome(OutcomeKind.Halted, Outcome.HaltedCode,
                    $"vcpu {string.Join(", ", _haltedForever.Order())} halted with interrupts disabled"));
        });
        Receive<VcpuProtocol.Stopped>(s =>
        {
            _stopped.Add(s.VcpuId);
            var outcome = s.Reason switch
            {
                VcpuProtocol.StopReason.Requested => null,
                VcpuProtocol.StopReason.TripleFault => new Outcome(OutcomeKind.TripleFault, Outcome.TripleFaultCode, s.Report),
                _ => new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, s.Report),
            };
            if (outcome is not null) End(outcome);
            TryFinish();
        });
        Receive<VcpuProtocol.Paused>(_ => { });
        Receive<VcpuProtocol.Resumed>(_ => { });
        Receive<Terminated>(t =>
        {
            var index = _vcpus.IndexOf(t.ActorRef);
            if (index < 0) return;
            _stopped.Add(index);
            End(new Outcome(OutcomeKind.VcpuError, Outcome.VcpuErrorCode, $"vcpu {index} actor terminated unexpectedly"));
            TryFinish();
        });
        Receive<EndTimeout>(_ => Finish());
    }

    protected override void PreStart()
    {
        var traced = _resources.Traced;
        Props Mailbox(Props p) => traced ? p.WithMailbox(TracedMailboxType.Id) : p;

        Context.ActorOf(Mailbox(VmspaceProtocol.Props(_resources.Memory)), "vmspace");
        var devices = new List<(DeviceSpec Spec, IActorRef Actor)>();
        foreach (var spec in _resources.Devices)
            devices.Add((spec, Context.ActorOf(Mailbox(DeviceProtocol.Props(spec.Name, spec.Factory, Self)), spec.Name)));

        foreach (var vcpu in _resources.Vcpus)
        {
            // Each vcpu gets its own routes: the write window is counted per vcpu and device.
            var ports = AddressBus<DeviceRoute>.Empty;
            var mmio = AddressBus<DeviceRoute>.Empty;
            foreach (var (spec, actor) in devices)
            {
                var route = new DeviceRoute(spec.Name, actor);
                if (spec.Space == DeviceProtocol.Space.Port) ports = ports.Insert(route, spec.Base, spec.Length);
                else mmio = mmio.Insert(route, spec.Base, spec.Length);
            }
            var wiring = new VcpuProtocol.Wiring(ports, mmio, Self, _resources.Memory);
            var actorRef = Context.ActorOf(VcpuProtocol.Props(vcpu, wiring), $"vcpu-{vcpu.Id}");
            Context.Watch(actorRef);
            _vcpus.Add(actorRef);
        }
    }

    protected override void PostStop()
    {
        // If the actor system went down before the VM ended, its watchers still learn of it.
        _ended.TrySetResult(_outcome ?? new Outcome(OutcomeKind.Stopped, Outcome.StoppedCode, "the VM actor stopped"));
    }

    private void StartBootVcpu()
    {
        if (_phase != Phase.Created || _vcpus.Count == 0) return;
        _phase = Phase.Running;
        _started.Add(0);
        _vcpus[0].Tell(VcpuProtocol.Start.Instance);
    }

    /// <summary>The first outcome wins; every vcpu is told to stop, then the VM finishes.</summary>
    private void End(Outcome outcome)
    {
        if (_outcome is not null) return;
        _outcome = outcome;
        _phase = Phase.Ending;
        for (var i = 0; i < _vcpus.Count; i++)
            if (!_stopped.Contains(i)) _vcpus[i].Tell(VcpuProtocol.Stop.Instance);
        Timers.StartSingleTimer(EndTimeout.Instance, EndTimeout.Instance, EndGrace);
        TryFinish();
    }

    private void TryFinish()
    {
        if (_outcome is not null && _stopped.Count == _vcpus.Count) Finish();
    }

    private void Finish()
    {
        if (_phase == Phase.Ended) return;
        _phase = Phase.Ended;
        Timers.CancelAll();
        var ended = new Ended(_resources.Name, _outcome!);
        foreach (var w in _watchers) w.Tell(ended);
        _ended.TrySetResult(_outcome!);
    }
}
