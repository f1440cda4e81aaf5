using Akka.Actor;
using ActorVmm.Devices;
using ActorVmm.Devices.Tracing;
using ActorVmm.Host.Boot;
using ActorVmm.Lapic;
using ActorVmm.LibVmm;
using ActorVmm.Memory;
using ActorVmm.Host.Snapshot;

namespace ActorVmm.Host.Vm;

/// <summary>
/// The one place that wires a VM together: opens KVM, lays out and loads guest memory, creates
/// the vcpus with the CPUID policy and boot registers, then the VM actor with its devices. All
/// checks that can fail happen here, before any actor exists, so a bad image or config is a clear
/// <see cref="VmBuildException"/> and nothing is left behind.
/// </summary>
public sealed class VmBuilder
{
    private readonly Task<ActorSystem> _system;
    private readonly VmSpec _spec;
    private readonly List<DeviceSpec> _devices = [];
    private SerialConsole? _console;
    private ITraceSink? _trace;
    private LinkFaultPlan? _linkFaults;

    public VmBuilder(ActorSystem system, VmSpec spec) : this(Task.FromResult(system), spec) { }

    /// <summary>A builder for an actor system that may still be starting: <see cref="Start"/> opens
    /// KVM and lays out and loads guest memory meanwhile, and waits for the system only to create the
    /// VM's actors. If the system fails to start, <see cref="Start"/> releases what it opened and
    /// throws the system's exception.</summary>
    public VmBuilder(Task<ActorSystem> system, VmSpec spec)
    {
        _system = system;
        _spec = spec;
    }

    /// <summary>The standard PC devices: COM1 UART (console, IRQ 4), debug-exit, i8042. The
    /// interrupt controllers and timers (IOAPIC, 8259 pair, PIT, RTC) and the reset and power
    /// registers (port 0x92, 0xCF9, the ACPI PM block) come with every VM (<see cref="Start"/>).</summary>
    public VmBuilder WithStandardDevices(SerialConsole console)
    {
        _console = console;
        AddDevice(PcPlatform.Com1(console.Write));
        AddDevice(PcPlatform.DebugExit());
        AddDevice(PcPlatform.I8042());
        return this;
    }

    public VmBuilder AddDevice(DeviceSpec device)
    {
        if (_devices.Any(d => d.Name == device.Name)) throw new VmBuildException($"two devices are named {device.Name}");
        _devices.Add(device);
        return this;
    }

    /// <summary>Records every message among this VM's actors to <paramref name="sink"/>.</summary>
    public VmBuilder WithTrace(ITraceSink sink)
    {
        _trace = sink;
        return this;
    }

    /// <summary>
    /// Builds the VM from a snapshot instead of booting it: the same machine (<see cref="VmRestore.ToSpec"/>
    /// must be this builder's spec), guest memory from the snapshot (on first touch, or all of it before
    /// the first vcpu runs with <see cref="VmRestore.Eager"/>), kvmclock and the device clock continued,
    /// every actor started from its saved state.
    /// </summary>
    public VmBuilder WithRestore(VmRestore restore)
    {
        if (restore.Spec.Cpus != _spec.Cpus || restore.Spec.MemoryBytes != _spec.MemoryBytes || restore.Spec.Lapic != _spec.Lapic)
            throw new VmBuildException("the VM to restore must be built with the snapshot's spec (VmRestore.ToSpec)");
        _restore = restore;
        return this;
    }

    private VmRestore? _restore;

    /// <summary>Fault injection on the links between the VM's actors (drop, delay or duplicate the
    /// messages from one actor to another): the VM's actors get the traced mailbox, which applies
    /// <paramref name="plan"/>.</summary>
    public VmBuilder WithLinkFaults(LinkFaultPlan plan)
    {
        _linkFaults = plan;
        return this;
    }

    /// <summary>Builds and starts the VM. Throws <see cref="VmBuildException"/> on any problem.</summary>
    public RunningVm Start()
    {
        if (_spec.Cpus is < 1 or > VmSpec.MaxCpus) throw new VmBuildException($"cpus must be 1..{VmSpec.MaxCpus}, not {_spec.Cpus}");
        CheckSharedMemory();
        foreach (var (device, _) in _spec.DeviceNodes)
            if (_devices.FirstOrDefault(d => d.Name == device) is not { Hostable: not null })
                throw new VmBuildException($"device {device} cannot run on another node (actorvmm.vm.devices.{device}.node)");
        if (_spec.HasGuestMemoryDevices) CheckGuestMemoryDevices();
        if (_spec.Rng && _devices.All(d => d.Name != PcPlatform.VirtioRngName)) _devices.Add(PcPlatform.VirtioRng());
        if (_spec.VirtioConsole && _devices.All(d => d.Name != PcPlatform.VirtioConsoleName))
        {
            var console = _console ?? throw new VmBuildException("a virtio console needs the VM's console (WithStandardDevices)");
            _devices.Add(PcPlatform.VirtioConsole(console.Write));
        }
        var disk = _spec.Disk is { } diskSpec ? OpenDisk(diskSpec) : null;
        Devices.Virtio.TapNetBackend? tap = null;
        try
        {
            if (disk is not null) _devices.Add(PcPlatform.VirtioBlk(disk, PcPlatform.DiskSerial(disk.Path)));
            tap = _spec.Net is { } net && _devices.All(d => d.Name != PcPlatform.VirtioNetName) ? OpenTap(net) : null;
            if (tap is not null) _devices.Add(PcPlatform.VirtioNet(tap, _spec.Net!.Mac));
            return StartWith(disk, tap);
        }
        catch
        {
            disk?.Dispose();
            tap?.Dispose();
            throw;
        }
    }

    /// <summary>Opens the disk's file, refusing (before anything else exists) a file that is missing, is
    /// not a regular file, cannot be opened as asked, is shorter than one sector, or carries no write
    /// permission at all while the disk is not read-only (root could open it for writing anyway; its
    /// owner marked it read-only, so <c>,ro</c> must say the same).</summary>
    private static Devices.Virtio.FileBlockBackend OpenDisk(DiskSpec disk)
    {
        var what = $"disk {disk.Path}";
        if (Directory.Exists(disk.Path)) throw new VmBuildException($"{what} is a directory, not a disk image");
        if (!File.Exists(disk.Path)) throw new VmBuildException($"{what} does not exist");
        const UnixFileMode anyWrite = UnixFileMode.UserWrite | UnixFileMode.GroupWrite | UnixFileMode.OtherWrite;
        if (!disk.ReadOnly && OperatingSystem.IsLinux() && (File.GetUnixFileMode(disk.Path) & anyWrite) == 0)
            throw new VmBuildException($"{what} is read-only (no write permission): use it read-only (--disk FILE,ro; actorvmm.vm.disk.read-only = on) or make it writable");
        Devices.Virtio.FileBlockBackend backend;
        try { backend = Devices.Virtio.FileBlockBackend.Open(disk.Path, disk.ReadOnly); }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            throw new VmBuildException($"{what} cannot be opened {(disk.ReadOnly ? "for reading" : "for reading and writing")}: {e.Message}" +
                                       (disk.ReadOnly ? "" : " (a disk only readable here needs ,ro / read-only = on)"));
        }
        if (backend.Length < Devices.Virtio.VirtioBlkRequest.SectorSize)
        {
            backend.Dispose();
            throw new VmBuildException($"{what} is {backend.Length} bytes, less than one 512-byte sector");
        }
        return backend;
    }

    /// <summary>Attaches to the card's TAP interface, which must exist (in this thread's network namespace);
    /// a missing one, one that is not a TAP, one in use or not permitted is refused here, before anything
    /// else exists, with what to do about it.</summary>
    private static Devices.Virtio.TapNetBackend OpenTap(NetSpec net)
    {
        try { return new Devices.Virtio.TapNetBackend(TapDevice.OpenExisting(net.Tap)); }
        catch (TapException e) { throw new VmBuildException($"network card on TAP \"{net.Tap}\": {e.Message}", e); }
    }

    private RunningVm StartWith(Devices.Virtio.FileBlockBackend? disk, Devices.Virtio.TapNetBackend? tap)
    {
        var firmwareImage = _spec.Boot.Firmware;
        var firmware = firmwareImage is not null;
        var pciFunctions = _devices.Select(d => d.PciFunction).OfType<ActorVmm.Devices.Pci.PciRemoteFunction>().ToArray();
        foreach (var chip in PcPlatform.InterruptControllersAndTimers(_spec.Cpus, biosLikePic: !firmware)
                     .Concat(PcPlatform.ResetAndPowerManagement()).Append(PcPlatform.PciHost(pciFunctions)))
            if (_devices.All(d => d.Name != chip.Name)) _devices.Add(chip);
        if (_spec.TestDevices)
        {
            CheckTestDevices(firmwareImage);
            if (_devices.All(d => d.Name != PcPlatform.TestDeviceName)) _devices.Add(PcPlatform.TestDevice());
        }
        var wiring = PlanWiring((ulong)(firmwareImage?.Length ?? 0));
        if (_restore is not null) CheckRestoredDevices(_restore);

        Kvm? kvm = null;
        VmHandle? vm = null;
        GuestMemoryMap? memory = null;
        SharedMemoryRegion? shm = null;
        var vcpus = new List<VcpuHandle>();
        IDisposable? traceRegistration = null;
        try
        {
            // The image first: a malformed one is reported as such, with or without KVM.
            // No transparent huge pages where userfaultfd fills the pages (demand paging, a lazy restore).
            memory = VmspaceLayout.Build(_spec.MemoryBytes, _spec.Boot.Firmware,
                superpages: _spec.Superpages && _spec.Paging is not { Userfaultfd: true } && (_restore is null || EagerRestore));
            // What a firmware would provide: the MP table and the ACPI tables (MADT: the vcpus and the
            // IOAPIC; FADT, FACS, DSDT: the PM block, reset register and S5). Written first, so an
            // image loaded over the BIOS area wins.
            // A restored VM's memory holds all of that already; its pages come from the snapshot.
            if (!firmware && _restore is null) PlatformTables.Write(memory, _spec.Cpus, PcPlatform.IoApicId(_spec.Cpus));
            var boot = _restore is null ? _spec.Boot.Load(memory) : null;
            if (_restore is not null && MemoryImage.Check(memory, MemoryRestoreOf(_restore)) is { } unusable)
                throw new VmBuildException($"cannot restore: {unusable}");
            shm = _spec.SharedMemory?.Open();
            if (shm is not null && shm.Size > Platform.SharedMemoryMaxSize)
                throw new VmBuildException($"shared memory {shm.Name} is {shm.Size >> 20} MiB, larger than its window ({Platform.SharedMemoryMaxSize >> 20} MiB)");
            StartupTimes.Mark("memory laid out");
            kvm = Kvm.Open();
            vm = kvm.CreateVm();
            var tracking = _spec.Paging?.DirtyTracking ?? DirtyTracking.UffdWp;
            // Both must be set before any slot logs dirty pages, the ring before the first vcpu.
            if (tracking == DirtyTracking.DirtyRing) vm.EnableDirtyRing(_spec.Paging!.DirtyRingEntries);
            if (tracking == DirtyTracking.DirtyLog)
            {
                if (kvm.CheckExtension(KvmCap.ManualDirtyLogProtect2) <= 0)
                    throw new VmBuildException("dirty-tracking = dirty-log needs KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, which this KVM lacks");
                vm.EnableManualDirtyLogProtect();
            }
            memory.RegisterWith(vm, logDirty: tracking != DirtyTracking.UffdWp);
            if (shm is not null)
            {
                // The device's window: host memory as one more memslot, after guest memory's; not
                // logged (the device's memory, not guest RAM). Set before any vcpu exists: no memslot
                // changes while vcpus run, so none has to go through the EPT barrier.
                vm.SetUserMemoryRegion((uint)memory.Segments.Count, new GuestPhysAddr(Platform.SharedMemoryBase), shm.Size, shm.Address);
                // A passthru-style device wires all guest memory (and its own window): resident and locked.
                memory.Wire();
                shm.Lock();
            }
            var assisted = _spec.Lapic == LapicMode.Assisted;
            // The split irqchip must exist before the first vcpu; its APIC MSRs are then the kernel's.
            if (assisted) vm.EnableSplitIrqchip(MsiEncoding.IoApicRoutes);
            else EmulateApicMsrs(vm);
            var cpuid = CpuidPolicy.ForModel(kvm.GetSupportedCpuid(), _spec.Cpu, ProvidedFeatures(kvm, assisted),
                CpuidPolicy.Hidden(kernelLapic: assisted));
            for (var i = 0; i < _spec.Cpus; i++)
            {
                var vcpu = vm.CreateVcpu(i, cpuid);
                vcpus.Add(vcpu);
                // KVM's copy of IA32_APIC_BASE drives CPUID.01H:EDX.APIC; the vlapic keeps the real
                // one and tells the vcpu each change, which passes it on (VcpuActor.OnApicBaseChanged).
                // KVM sets the same reset value itself; a KVM that refused the write would keep it.
                if (!assisted)
                {
                    try { vcpu.SetMsrs(new KvmMsrEntry { Index = ApicMsrs.ApicBase, Data = LocalApic.ResetBase(bsp: i == 0) }); }
                    catch (KvmException) { }
                }
            }
            boot?.ApplyTo(vcpus[0]);
            // KVM_SET_CLOCK before any vcpu's state (its MSRs) is restored: see VmHandle.RestoreClock.
            if (_restore?.Clock.Kvm is { } kvmClock) vm.RestoreClock(kvmClock, bringWallClockToNow: true);

            var name = SafeName(_spec.Name);
            var ended = new TaskCompletionSource<VmProtocol.Outcome>(TaskCreationOptions.RunContinuationsAsynchronously);
            var kernelApic = assisted ? new KvmApicBus(vm) : null;
            // A restored VM's device clock continues from the snapshot's: every armed timer in a saved
            // record is a deadline on it.
            var clock = _restore is null ? new MonotonicClock() : MonotonicClock.StartingAt(_restore.Clock.DeviceClock);
            // A restored VM's vmspace fills guest memory from the snapshot (VmspaceOptions.Restore).
            var paging = _restore is null ? _spec.Paging : (_spec.Paging ?? VmspaceOptions.Unpaged) with { Restore = MemoryRestoreOf(_restore) };
            var resources = new VmResources(_spec.Name, memory, vcpus, _devices, _trace is not null, clock,
                kernelApic is not null ? LapicBackends.KvmAssisted(kernelApic) : LapicBackends.Emulated(EmulatedLapicOptions(vcpus[0], clock, cpuid,
                    _restore?.Vcpus[0].Kvm.Tsc is { } savedTsc ? (savedTsc, _restore.Clock.DeviceClock) : null)),
                Paging: paging, FaultInjection: _linkFaults is not null, KernelApic: kernelApic,
                DirtyLog: tracking == DirtyTracking.DirtyLog ? vm : null)
            {
                Wiring = wiring,
                Spec = _spec,
                Kvm = vm,
                Restore = _restore is null ? null : new RestoredStates(_restore.Vcpus, _restore.Vlapics, _restore.Devices),
            };
            StartupTimes.Mark("vm prepared");
            var system = _system.GetAwaiter().GetResult();
            if (_spec.DeviceNodes.Count > 0 && system is Akka.Actor.Internal.ActorSystemImpl { Provider: not Akka.Cluster.ClusterActorRefProvider })
                throw new VmBuildException($"devices on other nodes ({string.Join(", ", _spec.DeviceNodes.Keys)}) need a host node in a cluster: " +
                                           "start the VM with `actorvmm ctl run` on an `actorvmm host` node");
            var registrations = new List<IDisposable>();
            traceRegistration = new Registrations(registrations);
            if (_trace is not null) registrations.Add(MessageTraceRegistry.Register(system, $"/user/{name}", _trace));
            if (_linkFaults is not null) registrations.Add(LinkFaultRegistry.Register(system, $"/user/{name}", _linkFaults));
            var actor = system.ActorOf(
                _trace is not null || _linkFaults is not null ? Props.Create(() => new VmActor(resources, ended)).WithMailbox(TracedMailboxType.Id)
                    : Props.Create(() => new VmActor(resources, ended)), name);
            actor.Tell(VmProtocol.Start.Instance);
            // The TAP's watcher stops before the TAP closes (RunningVm disposes in this order).
            var watcher = tap is null ? null
                : new BackendWatcher(tap.Tap, system.ActorSelection(actor.Path / PcPlatform.VirtioNetName), ended.Task).Start();
            IDisposable[] owned = [.. vcpus, memory, .. new IDisposable?[] { shm, disk, watcher, tap }.OfType<IDisposable>(), vm, kvm];
            return new RunningVm(_spec.Name, actor, memory, ended.Task, owned, traceRegistration) { SharedMemory = shm };
        }
        catch (Exception e)
        {
            traceRegistration?.Dispose();
            foreach (var v in vcpus) v.Dispose();
            memory?.Dispose();
            shm?.Dispose();
            vm?.Dispose();
            kvm?.Dispose();
            if (VmBuildException.IsBuildError(e)) throw new VmBuildException(e.Message, e);
            throw; // a VmBuildException, or the actor system's failure to start
        }
    }

    /// <summary>A restored VM has the snapshot's devices: each saved state belongs to one of its devices,
    /// and each of its devices that keeps state (it can be rebuilt from a record) has one.</summary>
    private void CheckRestoredDevices(VmRestore restore)
    {
        var names = _devices.Select(d => d.Name).ToHashSet(StringComparer.Ordinal);
        if (restore.Devices.Keys.FirstOrDefault(n => !names.Contains(n)) is { } unknown)
            throw new VmBuildException($"cannot restore: the snapshot has the state of a device \"{unknown}\" this VM does not have " +
                                       $"(its devices: {string.Join(", ", names.Order())})");
        if (_devices.FirstOrDefault(d => (d.Restore is not null || d.WiredRestore is not null) && !restore.Devices.ContainsKey(d.Name)) is { } missing)
            throw new VmBuildException($"cannot restore: the snapshot has no state for device \"{missing.Name}\"");
    }

    private MemoryRestore MemoryRestoreOf(VmRestore restore) =>
        new(restore.MemoryPath, Lazy: !EagerRestore, AccessedDirtyPath: restore.AccessDirtyPath);

    /// <summary>Guest memory comes in whole before the first vcpu runs: asked for (<c>--restore-eager</c>),
    /// or needed by a device that touches guest RAM itself (<see cref="CheckGuestMemoryDevices"/>).</summary>
    private bool EagerRestore => _restore is { Eager: true } || _spec.HasGuestMemoryDevices;

    /// <summary>
    /// A device that reads and writes guest RAM itself (virtio queues, through the host view of guest
    /// memory) and demand paging exclude each other: a page the device touches before the guest does is
    /// filled behind userfaultfd's back (the vmspace would never see its first touch, its swap slot or
    /// snapshot contents would be lost). Refused, as for the shared-memory device; a restore of such a
    /// VM is eager (<see cref="WithRestore"/>).
    /// </summary>
    private void CheckGuestMemoryDevices()
    {
        if (_spec.Paging is not { Userfaultfd: true }) return;
        var what = string.Join(", ", new (bool Has, string Device)[]
        {
            (_spec.Rng, "a virtio entropy device (rng)"), (_spec.Disk is not null, "a virtio disk"),
            (_spec.VirtioConsole, "a virtio console"), (_spec.Net is not null, "a virtio network card (net)"),
        }.Where(d => d.Has).Select(d => d.Device));
        throw new VmBuildException($"{what} reads and writes guest memory itself: demand paging (actorvmm.vm.paging.enabled) must be off");
    }

    /// <summary>A passthru-style device and demand paging exclude each other: its VM's memory is
    /// wired. Refused, not silently turned off: a swap file or resident limit asked for would
    /// otherwise be ignored without a word.</summary>
    private void CheckSharedMemory()
    {
        if (_spec.SharedMemory is null) return;
        if (_spec.Paging is { Userfaultfd: true })
            throw new VmBuildException("a VM with a shared-memory (passthru-style) device wires all guest memory: " +
                                       "demand paging (actorvmm.vm.paging.enabled) must be off");
    }

    /// <summary>
    /// The local APIC's MSRs exit to user space (to the vlapic): KVM_CAP_X86_USER_SPACE_MSR for
    /// filtered, unknown and invalid accesses, and a filter denying the x2APIC range 0x800-0x8FF,
    /// IA32_TSC_DEADLINE and IA32_APIC_BASE (KVM would otherwise answer the last two itself).
    /// A KVM without these capabilities runs the VM anyway: its guests get #GP on those MSRs
    /// (xAPIC MMIO still works).
    /// </summary>
    internal static void EmulateApicMsrs(VmHandle vm)
    {
        if (vm.System.CheckExtension(KvmCap.X86UserSpaceMsr) <= 0 || vm.System.CheckExtension(KvmCap.X86MsrFilter) <= 0) return;
        vm.EnableUserSpaceMsrExits(MsrExitReasons.Filter | MsrExitReasons.Unknown | MsrExitReasons.Invalid);
        const MsrAccess readWrite = MsrAccess.Read | MsrAccess.Write;
        vm.SetMsrFilter(
        [
            new MsrDenyRange(ApicMsrs.X2ApicFirst, ApicMsrs.X2ApicLast - ApicMsrs.X2ApicFirst + 1, readWrite),
            new MsrDenyRange(ApicMsrs.TscDeadline, 1, readWrite),
            new MsrDenyRange(ApicMsrs.ApicBase, 1, readWrite),
        ]);
    }

    /// <summary>The test devices' MMIO RAM must stay MMIO (suites run the instruction emulator on it):
    /// a firmware image, right-aligned below 4 GiB as a memslot, that reaches down to it is refused.</summary>
    private static void CheckTestDevices(byte[]? firmware)
    {
        if (firmware is null) return;
        var size = VmspaceLayout.AlignUp((ulong)firmware.Length);
        var iomemEnd = Platform.TestDevIomemBase + Platform.TestDevIomemLength;
        if (VmspaceLayout.FourGiB - size < iomemEnd)
            throw new VmBuildException(
                $"the firmware image ({firmware.Length} bytes, mapped at 0x{VmspaceLayout.FourGiB - size:X}-0xFFFFFFFF) overlaps the " +
                $"test devices' MMIO RAM at 0x{Platform.TestDevIomemBase:X}-0x{iomemEnd - 1:X}: with test devices on, a firmware image " +
                $"may be at most {(VmspaceLayout.FourGiB - iomemEnd) >> 10} KiB");
    }

    /// <summary>The devices' wiring (<see cref="VmWiring.Plan"/>), checked against what no device may
    /// sit under: guest memory's memslots (a device's accesses would never exit), each vcpu's local
    /// APIC page, and the shared-memory window (a memslot, not a device).</summary>
    /// <param name="firmwareBytes">the firmware image's length (0: none), for the memslots' places</param>
    private VmWiring PlanWiring(ulong firmwareBytes)
    {
        // A size the layout refuses is reported when memory is built.
        IReadOnlyList<LayoutRange> memslots;
        try { memslots = VmspaceLayout.Plan(_spec.MemoryBytes, firmwareBytes); }
        catch (ArgumentException) { memslots = []; }
        var reserved = memslots.Select(slot => ($"guest memory ({slot.Name})", slot.Base.Value, slot.Size))
            .Append(("local APIC", Platform.LocalApicBase, VlapicProtocol.MmioLength));
        if (_spec.SharedMemory is not null)
            reserved = reserved.Append(("shared memory", Platform.SharedMemoryBase, Platform.SharedMemoryMaxSize));
        try
        {
            return VmWiring.Plan(_devices, reserved);
        }
        catch (BusException e)
        {
            throw new VmBuildException($"device wiring: {e.Message}", e);
        }
    }

    /// <summary>
    /// CPUID features the platform provides beyond what KVM_GET_SUPPORTED_CPUID reports: the local
    /// APIC's x2APIC and TSC-deadline modes, which an emulated APIC implements, and which KVM's
    /// implements (x2APIC always; TSC-deadline where it reports KVM_CAP_TSC_DEADLINE_TIMER).
    /// </summary>
    private static IEnumerable<CpuFeature> ProvidedFeatures(Kvm kvm, bool assisted)
    {
        yield return CpuModel.Feature("x2apic");
        if (!assisted || kvm.CheckExtension(KvmCap.TscDeadlineTimer) > 0) yield return CpuModel.Feature("tsc-deadline");
    }

    /// <summary>
    /// The emulated local APICs' options: their TSC-deadline timers count in the guest's TSC, so
    /// they take its frequency from KVM and pair its value with the VM clock (the guest's RDTSC is
    /// KVM's IA32_TSC: offset from the host's on most hosts, the host's own on kvm_pvm). The modes
    /// they offer are those <paramref name="cpuid"/> shows (x2APIC, the TSC-deadline timer; null: both).
    /// </summary>
    /// <param name="restored">a restored VM's pairing: the guest TSC its snapshot saved and the device
    /// clock's reading at the save. The restored TSC and device clock both continue from those values,
    /// so the pairing holds again (the new vcpu's TSC is not yet the guest's when this is built).</param>
    internal static LapicOptions EmulatedLapicOptions(VcpuHandle vcpu, IDeviceClock clock, CpuidPolicy? cpuid = null,
        (ulong Tsc, TimeSpan At)? restored = null)
    {
        var options = new LapicOptions
        {
            BspLint0ExtInt = true,
            X2ApicSupported = cpuid?.Has(CpuModel.Feature("x2apic")) ?? true,
            TscDeadlineSupported = cpuid?.Has(CpuModel.Feature("tsc-deadline")) ?? true,
        };
        long khz;
        try { khz = vcpu.GetTscKhz(); }
        catch (KvmException) { return options; } // a KVM without KVM_GET_TSC_KHZ: deadlines in a nominal 1 GHz TSC
        TimeSpan at;
        ulong tsc;
        if (restored is { } saved) (tsc, at) = saved;
        else
        {
            var before = clock.Now;
            tsc = vcpu.GetGuestTsc();
            at = before + (clock.Now - before) / 2;
        }
        var elapsed = (ulong)((Int128)at.Ticks * khz * 1000 / TimeSpan.TicksPerSecond);
        return options with { TscFrequencyHz = khz * 1000, TscAtClockZero = tsc >= elapsed ? tsc - elapsed : 0 };
    }

    private sealed class Registrations(List<IDisposable> all) : IDisposable
    {
        public void Dispose()
        {
            foreach (var r in all) r.Dispose();
            all.Clear();
        }
    }

    private static string SafeName(string name)
    {
        var chars = name.Select(c => char.IsAsciiLetterOrDigit(c) || c is '-' or '_' ? c : '-').ToArray();
        return "vm-" + new string(chars);
    }
}

/// <summary>Building a VM failed; the message says why in terms a user can act on.</summary>
public sealed class VmBuildException(string message, Exception? inner = null) : Exception(message, inner)
{
    /// <summary>
    /// Whether <paramref name="e"/>, thrown while building, is the user's to act on (a bad image or
    /// config, a host that lacks something: every <see cref="VmmException"/>, and an
    /// <see cref="ArgumentException"/> from a check of the spec) rather than a bug or the actor
    /// system's own failure to start.
    /// </summary>
    public static bool IsBuildError(Exception e) => e is VmmException or ArgumentException;
}

/// <summary>
/// A VM that has been started. Owns the KVM resources: they are released only after the VM actor
/// and its vcpus have stopped, so no vcpu thread can touch unmapped memory.
/// </summary>
public sealed class RunningVm : IAsyncDisposable
{
    private readonly IReadOnlyList<IDisposable> _resources;
    private readonly IDisposable? _traceRegistration;
    private int _disposed;

    public string Name { get; }
    public IActorRef Actor { get; }

    /// <summary>Guest memory, readable after the VM ended until disposal (tests check what the guest wrote).</summary>
    public IGuestMemory Memory { get; }

    /// <summary>The shared-memory device's host memory (the guest sees it at <see cref="Platform.SharedMemoryBase"/>);
    /// null without one. Valid until disposal.</summary>
    public SharedMemoryRegion? SharedMemory { get; init; }

    public Task<VmProtocol.Outcome> Ended { get; }

    internal RunningVm(string name, IActorRef actor, IGuestMemory memory, Task<VmProtocol.Outcome> ended,
        IReadOnlyList<IDisposable> resources, IDisposable? traceRegistration)
    {
        Name = name;
        Actor = actor;
        Memory = memory;
        Ended = ended;
        _resources = resources;
        _traceRegistration = traceRegistration;
    }

    /// <summary>Waits for the VM to end, or stops it after <paramref name="timeout"/>.</summary>
    public async Task<VmProtocol.Outcome> WaitAsync(TimeSpan timeout)
    {
        var done = await Task.WhenAny(Ended, Task.Delay(timeout));
        if (done != Ended) Actor.Tell(new VmProtocol.Stop($"timed out after {timeout.TotalSeconds:0.#} s"));
        return await Ended;
    }

    public async ValueTask DisposeAsync()
    {
        if (Interlocked.Exchange(ref _disposed, 1) != 0) return;
        var stopped = false;
        try
        {
            if (!Ended.IsCompleted) Actor.Tell(new VmProtocol.Stop("disposed"));
            stopped = await Actor.GracefulStop(TimeSpan.FromSeconds(10));
        }
        catch (Exception)
        {
            stopped = Actor.IsNobody();
        }
        _traceRegistration?.Dispose();
        // A vcpu still inside KVM_RUN would fault on unmapped memory: leak rather than crash.
        if (!stopped) return;
        foreach (var r in _resources) r.Dispose();
    }
}
