using System.Diagnostics;
using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Host.Snapshot;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Vm;

/// <summary>
/// Takes one snapshot of a running VM, as a child of its VM actor, in steps:
/// <list type="number">
/// <item>pause every vcpu: each answers <see cref="VcpuProtocol.Paused"/> at an instruction boundary,
/// with no device reply in flight;</item>
/// <item>drain: every device and vlapic answers <see cref="DeviceProtocol.Sync"/> / its state request after
/// what is already in its mailbox (the vcpus' posted writes, which precede their Paused), in
/// <see cref="DrainRounds"/> rounds, so a write that raised an interrupt line has reached the
/// interrupt controllers and the vlapics;</item>
/// <item>collect: every vcpu's state (KVM's, in KVM's order, and its user-space state), every vlapic's,
/// every device's state record, the VM's clocks; then guest memory, written by the vmspace;</item>
/// <item>write the parts and, last, the manifest (<see cref="SnapshotDirectory"/>).</item>
/// </list>
/// It answers its parent <see cref="Done"/> or <see cref="Failed"/> (the parent resumes or stops the
/// VM); a failure at any step removes what was written. Nothing it does changes the guest.
/// </summary>
internal sealed class SnapshotTaker : ReceiveActor, IWithTimers
{
    /// <summary>Everything the snapshot reads, from the VM actor.</summary>
    internal sealed record Sources(
        VmSpec Spec,
        IReadOnlyList<IActorRef> Vcpus,
        IReadOnlyList<IActorRef> Vlapics,
        IReadOnlyList<IActorRef> Devices,
        IActorRef Vmspace,
        IDeviceClock Clock,
        VmHandle? Kvm);

    internal sealed record Done(string Directory, long MemoryPages, long MemoryBytes, TimeSpan Paused, TimeSpan Total, ulong[]? WrittenPages = null);

    internal sealed record Failed(string Directory, string Reason);

    private sealed record StepTimeout(string Step);

    /// <summary>How long one step may take before the snapshot is given up (memory writing included).</summary>
    public static readonly TimeSpan StepLimit = TimeSpan.FromSeconds(60);

    /// <summary>Device → interrupt controller → vlapic: the longest chain of posted messages between
    /// the VM's actors, each round of barriers moves a message one link further.</summary>
    public const int DrainRounds = 3;

    private readonly Sources _sources;
    private readonly string _directory;
    private readonly Stopwatch _total = Stopwatch.StartNew();
    private SnapshotWriter? _writer;
    private readonly HashSet<int> _paused = [];
    private readonly HashSet<long> _waiting = [];
    private readonly Dictionary<int, VcpuSnapshot> _vcpus = [];
    private readonly Dictionary<int, LapicState> _vlapics = [];
    private readonly Dictionary<string, object?> _devices = new(StringComparer.Ordinal);
    private long _lastId;
    private int _drainRound;
    private TimeSpan _pausedAt;
    private SavedClock? _clock;
    private long _memoryId;

    public ITimerScheduler Timers { get; set; } = null!;

    private readonly string? _precopied;
    private readonly string? _writeLog;

    public SnapshotTaker(Sources sources, string directory, string? precopied = null, string? writeLog = null)
    {
        _sources = sources;
        _directory = directory;
        _precopied = precopied;
        _writeLog = writeLog;
        Become(Pausing);
    }

    /// <param name="precopied">a memory file kept current while write log <paramref name="writeLog"/> was on:
    /// only the pages written since that log's last save are written, into it, and it becomes the memory part</param>
    /// <param name="writeLog">the write log that save reads; a whole save starts it over</param>
    public static Props Props(Sources sources, string directory, string? precopied = null, string? writeLog = null) =>
        Akka.Actor.Props.Create(() => new SnapshotTaker(sources, directory, precopied, writeLog));

    protected override void PreStart()
    {
        try
        {
            _writer = SnapshotDirectory.Create(_directory, _sources.Spec.Name);
        }
        catch (SnapshotException e)
        {
            Fail(e.Message);
            return;
        }
        Step("pausing the vcpus");
        foreach (var vcpu in _sources.Vcpus) vcpu.Tell(VcpuProtocol.Pause.Instance);
    }

    private void Pausing()
    {
        Receive<VcpuProtocol.Paused>(p =>
        {
            _paused.Add(p.VcpuId);
            if (_paused.Count < _sources.Vcpus.Count) return;
            _pausedAt = _total.Elapsed;
            Become(Draining);
            NextDrainRound();
        });
        Common();
    }

    private void Draining()
    {
        Receive<DeviceProtocol.Completed>(c =>
        {
            _waiting.Remove(c.Id);
            if (_waiting.Count == 0) NextDrainRound();
        });
        Common();
    }

    /// <summary>One barrier to every device per round; then the vcpus' state.</summary>
    private void NextDrainRound()
    {
        if (_drainRound++ < DrainRounds && _sources.Devices.Count > 0)
        {
            Step($"draining the devices (round {_drainRound})");
            foreach (var device in _sources.Devices)
            {
                var id = ++_lastId;
                _waiting.Add(id);
                device.Tell(new DeviceProtocol.Sync(id));
            }
            return;
        }
        Become(SavingVcpus);
        Step("saving the vcpus");
        foreach (var vcpu in _sources.Vcpus) vcpu.Tell(VcpuProtocol.SaveState.Instance);
    }

    private void SavingVcpus()
    {
        Receive<VcpuProtocol.SavedState>(s =>
        {
            _vcpus[s.VcpuId] = s.Snapshot;
            if (_vcpus.Count < _sources.Vcpus.Count) return;
            Become(SavingDevices);
            Step("saving the vlapics and devices");
            foreach (var vlapic in _sources.Vlapics) vlapic.Tell(VlapicProtocol.GetState.Instance);
            foreach (var device in _sources.Devices)
            {
                var id = ++_lastId;
                _waiting.Add(id);
                device.Tell(new DeviceProtocol.GetState(id));
            }
            if (_sources.Vlapics.Count == 0 && _sources.Devices.Count == 0) SaveMemory();
        });
        Receive<VcpuProtocol.Refused>(r => Fail($"vcpu {r.VcpuId} refused to save its state: {r.Why}"));
        Common();
    }

    private void SavingDevices()
    {
        Receive<VlapicProtocol.StateReply>(r =>
        {
            _vlapics[r.VcpuId] = r.State;
            MaybeDevicesDone();
        });
        Receive<DeviceProtocol.StateReply>(r =>
        {
            if (!_waiting.Remove(r.Id)) return;
            if (r.Error is { } error)
            {
                Fail($"{r.Device} could not save its state: {error}");
                return;
            }
            _devices[r.Device] = r.State;
            MaybeDevicesDone();
        });
        Common();
    }

    private void MaybeDevicesDone()
    {
        if (_waiting.Count == 0 && _vlapics.Count == _sources.Vlapics.Count) SaveMemory();
    }

    /// <summary>The VM's clocks are read once every vcpu and device is still; then the vmspace writes
    /// guest memory (on its own thread).</summary>
    private void SaveMemory()
    {
        try
        {
            _clock = new SavedClock(_sources.Clock.Now, _sources.Kvm?.SaveClock());
        }
        catch (KvmException e)
        {
            Fail($"cannot read the VM's kvmclock: {e.Message}");
            return;
        }
        Become(SavingMemory);
        Step("writing guest memory");
        _memoryId = ++_lastId;
        _sources.Vmspace.Tell(new VmspaceProtocol.SaveMemory(_memoryId, _writer!.PathFor(SnapshotParts.Memory),
            _writer.PathFor(SnapshotParts.MemoryAccessDirty)) { WrittenOnly = _precopied is not null, From = _precopied, Log = _writeLog });
    }

    private void SavingMemory()
    {
        Receive<VmspaceProtocol.MemorySaved>(m =>
        {
            if (m.Id != _memoryId) return;
            if (m.Error is { } error)
            {
                Fail($"guest memory could not be saved: {error}");
                return;
            }
            try
            {
                WriteParts();
            }
            catch (Exception e) when (e is SnapshotException or IOException or UnauthorizedAccessException or NotSupportedException
                                          or System.Text.Json.JsonException or InvalidOperationException)
            {
                Fail($"cannot write the snapshot: {e.Message}");
                return;
            }
            _finished = true;
            Timers.CancelAll();
            Context.Parent.Tell(new Done(_directory, m.Pages, m.Bytes, _total.Elapsed - _pausedAt, _total.Elapsed, m.Written));
            Context.Stop(Self);
        });
        Common();
    }

    /// <summary>Every part but memory (written by the vmspace), then the manifest.</summary>
    private void WriteParts()
    {
        var writer = _writer!;
        writer.AddWrittenFile(SnapshotParts.Memory);
        if (File.Exists(writer.PathFor(SnapshotParts.MemoryAccessDirty))) writer.AddWrittenFile(SnapshotParts.MemoryAccessDirty);
        writer.WriteJson(SnapshotParts.Spec, SavedSpec.From(_sources.Spec));
        writer.WriteJson(SnapshotParts.Clock, _clock!);
        if (_sources.Spec.Boot.Firmware is { } firmware) writer.WriteBytes(SnapshotParts.Firmware, firmware);
        foreach (var (id, vcpu) in _vcpus.OrderBy(v => v.Key)) writer.WriteJson(SnapshotParts.Vcpu(id), vcpu);
        foreach (var (id, lapic) in _vlapics.OrderBy(v => v.Key)) writer.WriteJson(SnapshotParts.Vlapic(id), lapic);
        foreach (var (name, state) in _devices.OrderBy(d => d.Key, StringComparer.Ordinal))
            if (state is not null) writer.WriteBytes(SnapshotParts.Device(name), DeviceStateCodec.Encode(state));
        writer.Complete();
    }

    private void Common()
    {
        Receive<StepTimeout>(t => Fail($"{t.Step} took longer than {StepLimit.TotalSeconds:0} s"));
        Receive<VcpuProtocol.Resumed>(_ => { });
    }

    private void Step(string name) => Timers.StartSingleTimer("step", new StepTimeout(name), StepLimit);

    /// <summary>Stopped before it finished (the VM ended meanwhile): nothing half-written stays.</summary>
    protected override void PostStop()
    {
        if (!_finished) _writer?.Abandon();
    }

    private bool _finished;

    private void Fail(string reason)
    {
        _finished = true;
        Timers.CancelAll();
        _writer?.Abandon();
        Context.Parent.Tell(new Failed(_directory, reason));
        Context.Stop(Self);
    }
}
