using ActorVmm.Devices;
using ActorVmm.Host.Snapshot;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Tests;

/// <summary>
/// A snapshot read back for `run --restore` (<see cref="VmRestore.Open"/>): a well-formed one decodes
/// whole, and one whose parts are whole (the manifest matches them) but say something wrong is
/// refused before anything is built, with a message naming the part and what is wrong with it.
/// </summary>
public sealed class VmRestoreTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    internal sealed record Parts(SavedSpec Spec, int Vcpus, Func<int, VcpuKvmState> Vcpu, IReadOnlyDictionary<string, byte[]> Devices);

    private static VcpuKvmState Kvm(int registersBytes = KvmStateSizes.Regs) => new()
    {
        Registers = new byte[registersBytes],
        SpecialRegisters = new byte[KvmStateSizes.Sregs],
        Fpu = new byte[KvmStateSizes.Fpu],
        DebugRegisters = new byte[KvmStateSizes.DebugRegs],
        Msrs = [new MsrValue(SavedMsrs.Tsc, 123_456)],
        Events = new byte[KvmStateSizes.VcpuEvents],
    };

    internal static Parts Good(int cpus = 1) => new(
        new SavedSpec("saved", 16 << 20, cpus, LapicMode.Emulated, "host", Superpages: false, TestDevices: false, Paging: null,
            SharedMemory: null, HasFirmware: false),
        cpus, _ => Kvm(),
        new Dictionary<string, byte[]> { ["uart0"] = DeviceStateCodec.Encode(((IStatefulDevice)new Uart16550(new NullInterruptLine(), _ => { })).SaveState()) });

    private string Write(Parts parts, string name = "snap") => Write(parts, _dir.File(name), 16 << 20);

    /// <summary>A well-formed snapshot of <paramref name="parts"/> at <paramref name="path"/>, its guest memory
    /// <paramref name="memoryBytes"/> of holes (or <paramref name="memory"/> writes into it).</summary>
    internal static string Write(Parts parts, string path, long memoryBytes, Action<FileStream>? memory = null)
    {
        var writer = SnapshotDirectory.Create(path, parts.Spec.Name);
        writer.WriteJson(SnapshotParts.Spec, parts.Spec);
        writer.WriteJson(SnapshotParts.Clock, new SavedClock(TimeSpan.FromSeconds(3), new VmKvmState(5_000_000_000, 0, 1_700_000_000_000_000_000, null)));
        for (var i = 0; i < parts.Vcpus; i++)
        {
            writer.WriteJson(SnapshotParts.Vcpu(i), new VcpuSnapshot(i, parts.Vcpu(i), VcpuProtocol.State.Running, PendingInterruptsState.None));
            writer.WriteJson(SnapshotParts.Vlapic(i), new LocalApic((uint)i, new NullLapicEvents(), new ManualClock(), bsp: i == 0).State());
        }
        foreach (var (device, state) in parts.Devices) writer.WriteBytes(SnapshotParts.Device(device), state);
        writer.WriteFile(SnapshotParts.Memory, file =>
        {
            using var stream = File.Create(file);
            stream.SetLength(memoryBytes);
            memory?.Invoke(stream);
        });
        writer.Complete();
        return path;
    }

    [Fact]
    public void A_well_formed_snapshot_decodes_whole()
    {
        var restore = VmRestore.Open(Write(Good(cpus: 2)), eager: true);
        Assert.Equal("saved", restore.Spec.Name);
        Assert.Equal(2, restore.Vcpus.Count);
        Assert.Equal(123_456UL, restore.Vcpus[1].Kvm.Tsc);
        Assert.Equal(2, restore.Vlapics.Count);
        Assert.Equal(1u, restore.Vlapics[1].ApicId);
        Assert.IsType<UartState>(restore.Devices["uart0"]);
        Assert.Equal(TimeSpan.FromSeconds(3), restore.Clock.DeviceClock);
        Assert.True(restore.Eager);
        var spec = restore.ToSpec("renamed");
        Assert.Equal(("renamed", 16UL << 20, 2, LapicMode.Emulated), (spec.Name, spec.MemoryBytes, spec.Cpus, spec.Lapic));
        Assert.Throws<InvalidOperationException>(() => spec.Boot.Load(null!)); // a restored VM loads no image
    }

    [Fact]
    public void A_spec_without_vcpus_is_refused()
    {
        var e = Assert.Throws<SnapshotException>(() => VmRestore.Open(Write(Good() with { Spec = Good().Spec with { Cpus = 0 }, Vcpus = 0 })));
        Assert.Contains("has 0 vcpus", e.Message);
    }

    [Fact]
    public void A_cpu_model_this_host_does_not_know_is_refused()
    {
        var e = Assert.Throws<SnapshotException>(() => VmRestore.Open(Write(Good() with { Spec = Good().Spec with { Cpu = "host,+warp-drive" } })));
        Assert.Contains("CPU model", e.Message);
        Assert.Contains("warp-drive", e.Message);
    }

    [Fact]
    public void A_vcpu_whose_registers_are_cut_short_is_refused_naming_its_part()
    {
        var e = Assert.Throws<SnapshotException>(() => VmRestore.Open(Write(Good() with { Vcpu = _ => Kvm(registersBytes: 100) })));
        Assert.Contains("\"vcpu-0\"", e.Message);
        Assert.Contains("Registers", e.Message);
    }

    [Fact]
    public void A_missing_vcpu_part_is_refused()
    {
        var e = Assert.Throws<SnapshotException>(() => VmRestore.Open(Write(Good(cpus: 2) with { Vcpus = 1 })));
        Assert.Contains("no part \"vcpu-1\"", e.Message);
    }

    [Fact]
    public void A_device_state_of_a_foreign_type_is_refused_naming_its_part()
    {
        var foreign = "{\"type\":\"System.Diagnostics.Process\",\"state\":{\"startInfo\":{\"fileName\":\"/bin/sh\"}}}"u8.ToArray();
        var e = Assert.Throws<SnapshotException>(() =>
            VmRestore.Open(Write(Good() with { Devices = new Dictionary<string, byte[]> { ["uart0"] = foreign } })));
        Assert.Contains("\"device-uart0\"", e.Message);
        Assert.Contains("System.Diagnostics.Process", e.Message);
    }

    [Fact]
    public void A_snapshot_without_guest_memory_is_refused()
    {
        var path = _dir.File("nomemory");
        var writer = SnapshotDirectory.Create(path, "saved");
        writer.WriteJson(SnapshotParts.Spec, Good().Spec);
        writer.WriteJson(SnapshotParts.Clock, new SavedClock(TimeSpan.Zero, null));
        writer.WriteJson(SnapshotParts.Vcpu(0), new VcpuSnapshot(0, Kvm(), VcpuProtocol.State.Running, PendingInterruptsState.None));
        writer.WriteJson(SnapshotParts.Vlapic(0), new LocalApic(0, new NullLapicEvents(), new ManualClock(), bsp: true).State());
        writer.Complete();
        var e = Assert.Throws<SnapshotException>(() => VmRestore.Open(path));
        Assert.Contains("no guest memory", e.Message);
    }
}
