using ActorVmm.Devices;
using ActorVmm.Host.Boot;
using ActorVmm.Host.Vm;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Vcpu;

namespace ActorVmm.Host.Snapshot;

/// <summary>
/// A snapshot read back for <c>actorvmm run --restore</c>: every part decoded and checked against the
/// spec before anything is built (<see cref="Open"/> throws a <see cref="SnapshotException"/> naming
/// what is wrong, and nothing is started). Guest memory is only checked by length here: a lazy
/// restore reads its pages on first touch.
/// </summary>
public sealed class VmRestore
{
    private VmRestore(SnapshotDirectory snapshot, SavedSpec spec, SavedClock clock, VcpuSnapshot[] vcpus, LapicState[] vlapics,
        Dictionary<string, object> devices, byte[]? firmware, bool eager)
    {
        Snapshot = snapshot;
        Spec = spec;
        Clock = clock;
        Vcpus = vcpus;
        Vlapics = vlapics;
        Devices = devices;
        Firmware = firmware;
        Eager = eager;
    }

    public SnapshotDirectory Snapshot { get; }
    public SavedSpec Spec { get; }
    public SavedClock Clock { get; }
    public IReadOnlyList<VcpuSnapshot> Vcpus { get; }
    public IReadOnlyList<LapicState> Vlapics { get; }
    public IReadOnlyDictionary<string, object> Devices { get; }
    public byte[]? Firmware { get; }

    /// <summary>Read all of guest memory before the first vcpu runs (<c>--restore-eager</c>) instead of
    /// each page on its first touch.</summary>
    public bool Eager { get; }

    public string MemoryPath => Snapshot.PathOf(SnapshotParts.Memory);

    public string? AccessDirtyPath => Snapshot.Has(SnapshotParts.MemoryAccessDirty) ? Snapshot.PathOf(SnapshotParts.MemoryAccessDirty) : null;

    public static VmRestore Open(string directory, bool eager = false)
    {
        var snapshot = SnapshotDirectory.Open(directory);
        var spec = snapshot.ReadJson<SavedSpec>(SnapshotParts.Spec);
        if (spec.Cpus is < 1 or > VmSpec.MaxCpus)
            throw new SnapshotException($"the snapshot at {directory} has {spec.Cpus} vcpus; a VM has 1 to {VmSpec.MaxCpus}");
        if (spec.MemoryBytes == 0) throw new SnapshotException($"the snapshot at {directory} has no guest memory");
        try { CpuModel.Parse(spec.Cpu); }
        catch (FormatException e) { throw new SnapshotException($"the snapshot at {directory} names a CPU model this host does not know: {e.Message}"); }
        var clock = snapshot.ReadJson<SavedClock>(SnapshotParts.Clock);
        if (clock.DeviceClock < TimeSpan.Zero) throw new SnapshotException($"the snapshot at {directory} has a negative device clock");

        var vcpus = new VcpuSnapshot[spec.Cpus];
        for (var i = 0; i < spec.Cpus; i++)
        {
            var vcpu = snapshot.ReadJson<VcpuSnapshot>(SnapshotParts.Vcpu(i));
            try { vcpu.Validate(i); }
            catch (Exception e) when (e is ArgumentException or VmmException or InvalidOperationException)
            {
                throw new SnapshotException($"part \"{SnapshotParts.Vcpu(i)}\" of {directory} is not a vcpu's state: {e.Message}", e);
            }
            vcpus[i] = vcpu;
        }
        var vlapics = spec.Lapic == LapicMode.Emulated
            ? Enumerable.Range(0, spec.Cpus).Select(i => snapshot.ReadJson<LapicState>(SnapshotParts.Vlapic(i))).ToArray()
            : [];

        var devices = new Dictionary<string, object>(StringComparer.Ordinal);
        foreach (var part in snapshot.Manifest.Parts.Where(p => p.Name.StartsWith(SnapshotParts.DevicePrefix, StringComparison.Ordinal)))
        {
            var name = part.Name[SnapshotParts.DevicePrefix.Length..];
            try
            {
                devices[name] = DeviceStateCodec.Decode(snapshot.ReadBytes(part.Name));
            }
            catch (SnapshotStateException e)
            {
                throw new SnapshotException($"part \"{part.Name}\" of {directory} is not a state of device {name}: {e.Message}", e);
            }
        }
        if (!snapshot.Has(SnapshotParts.Memory)) throw new SnapshotException($"the snapshot at {directory} has no guest memory part");
        byte[]? firmware = null;
        if (spec.HasFirmware) firmware = snapshot.ReadBytes(SnapshotParts.Firmware);
        return new VmRestore(snapshot, spec, clock, vcpus, vlapics, devices, firmware, eager);
    }

    /// <summary>The machine to build: the snapshot's, under <paramref name="name"/> if given.</summary>
    public VmSpec ToSpec(string? name = null) =>
        new(name ?? Spec.Name, Spec.MemoryBytes, Spec.Cpus, new RestoredImage(Firmware), Spec.Lapic, Spec.Paging, Spec.Superpages,
            Spec.SharedMemory, Spec.TestDevices) { Cpu = CpuModel.Parse(Spec.Cpu), Rng = Spec.Rng, Disk = Spec.Disk, VirtioConsole = Spec.VirtioConsole, Net = Spec.NetCard() };
}

/// <summary>What a restored VM "boots": nothing is loaded (guest memory comes from the snapshot); a
/// firmware image is mapped again where it was.</summary>
public sealed record RestoredImage(byte[]? FirmwareBytes) : BootImage
{
    public override byte[]? Firmware => FirmwareBytes;

    public override BootState Load(IGuestMemory memory) =>
        throw new InvalidOperationException("a restored VM loads no image: its memory comes from the snapshot");
}
