using ActorVmm.Testing;
using static ActorVmm.LibVmm.Tests.TestGuests;

namespace ActorVmm.LibVmm.Tests;

/// <summary>LibVmm against real KVM: system ioctls, register round trips, tiny real-mode guests.
/// Skipped without KVM unless ACTORVMM_REQUIRE_KVM=1.</summary>
public sealed class KvmTests
{
    private const ulong RflagsReserved = 0b0000_0010; // bit 1 always reads 1
    private const ulong RamSize = 0x1_0000;

    [KvmFact]
    public void Open_checks_api_version_12()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();

        Assert.Equal(Kvm.ExpectedApiVersion, kvm.ApiVersion);
        Assert.Equal(12, kvm.ApiVersion);
        Assert.True(kvm.VcpuMmapSize >= KernelAbi.KvmRunSize, $"vcpu mmap size {kvm.VcpuMmapSize}");
    }

    [KvmFact]
    public void Required_capabilities_are_present()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();

        Assert.True(kvm.CheckExtension(KvmCap.UserMemory) > 0);
        Assert.All(Kvm.RequiredCapabilities, cap => Assert.True(kvm.CheckExtension(cap) > 0, $"{cap}"));
    }

    [KvmFact]
    public void Supported_cpuid_includes_leaves_0_and_1()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();

        var entries = kvm.GetSupportedCpuid();

        var leaf0 = Assert.Single(entries, e => e.Function == 0);
        Assert.True(leaf0.Eax >= 1, $"max basic leaf {leaf0.Eax}");
        Assert.Contains(entries, e => e.Function == 1);
    }

    [KvmFact]
    public void Registers_round_trip()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        var regs = guest.Vcpu.GetRegisters();
        regs.Rax = 0x1234;
        regs.Rip = 0x1000;
        regs.Rflags = RflagsReserved;

        guest.Vcpu.SetRegisters(regs);
        var back = guest.Vcpu.GetRegisters();

        Assert.Equal(0x1234ul, back.Rax);
        Assert.Equal(0x1000ul, back.Rip);
        Assert.Equal(RflagsReserved, back.Rflags);
    }

    [KvmFact]
    public void Special_registers_round_trip()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        var sregs = guest.Vcpu.GetSpecialRegisters();
        sregs.Cs.Selector = 0x0100;
        sregs.Cs.Base = 0x1000;

        guest.Vcpu.SetSpecialRegisters(sregs);
        var back = guest.Vcpu.GetSpecialRegisters();

        Assert.Equal((ushort)0x0100, back.Cs.Selector);
        Assert.Equal(0x1000ul, back.Cs.Base);
    }

    [KvmFact]
    public void Guest_cpuid_shows_the_policy_and_the_vcpu_apic_id()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest(vcpuId: 3);
        guest.Load(Cpuid1());

        var ecx = Assert.IsType<VmExit.Io>(guest.NextExit());
        var ebx = Assert.IsType<VmExit.Io>(guest.NextExit());
        Assert.IsType<VmExit.Hlt>(guest.NextExit());

        Assert.Equal(((ushort)OutPort, 4), (ecx.Port, ecx.Size));
        Assert.Equal(((ushort)OutPort2, 4), (ebx.Port, ebx.Size));
        // The policy hides what KVM reports as supported. kvm_pvm reports few leaf-1 features (CX16,
        // x2APIC, hypervisor) yet shows its guests the host's others (XSAVE, AVX): those it cannot hide.
        var supported = (ulong)guest.Kvm.GetSupportedCpuid().First(e => e.Function == 1).Ecx;
        Assert.NotEqual(0ul, supported & CpuidPolicy.Leaf1EcxCx16); // every KVM seen reports it: a real check
        Assert.Equal(0ul, ecx.Value & CpuidPolicy.Leaf1EcxCx16);
        Assert.Equal(0ul, ecx.Value & supported & (CpuidPolicy.Leaf1EcxXsave | CpuidPolicy.Leaf1EcxOsxsave | CpuidPolicy.Leaf1EcxAvx));
        Assert.NotEqual(0ul, ecx.Value & CpuidPolicy.Leaf1EcxHypervisor);
        Assert.Equal(3ul, ebx.Value >> 24); // initial APIC id
    }

    [KvmFact]
    public void Real_mode_guest_outputs_a_byte_then_halts()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        var code = OutThenHlt();
        guest.Load(code);

        var io = Assert.IsType<VmExit.Io>(guest.NextExit());
        Assert.Equal(new VmExit.Io(true, OutPort, 1, 1, 0x41, null), io);
        Assert.IsType<VmExit.Hlt>(guest.NextExit());
        Assert.Equal(CodeAddress + (ulong)code.Length, guest.Vcpu.GetRegisters().Rip);
    }

    [KvmFact]
    public void Real_mode_guest_reads_what_CompleteIoIn_supplies()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        guest.Load(Echo());

        Assert.Equal(new VmExit.Io(false, InPort, 1, 1, 0, null), guest.NextExit());
        guest.Vcpu.CompleteIoIn(0, 0x5A);
        Assert.Equal(new VmExit.Io(true, OutPort2, 1, 1, 0x5A, null), guest.NextExit());
        Assert.IsType<VmExit.Hlt>(guest.NextExit());
    }

    [KvmFact]
    public void Real_mode_guest_mmio_outside_ram_exits_to_userspace()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        guest.Load(MmioWriteRead());

        Assert.Equal(new VmExit.Mmio(MmioWriteAddress, true, 1, 0x99), guest.NextExit());
        Assert.Equal(new VmExit.Mmio(MmioReadAddress, false, 1, 0), guest.NextExit());
        guest.Vcpu.CompleteMmioRead(0x42);
        Assert.Equal(new VmExit.Io(true, OutPort, 1, 1, 0x42, null), guest.NextExit());
        Assert.IsType<VmExit.Hlt>(guest.NextExit());
    }

    [KvmFact]
    public void Guest_writes_are_visible_through_the_memory_map()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        guest.Load(StoreThenHlt());

        Assert.IsType<VmExit.Hlt>(guest.NextExit());

        var b = new byte[1];
        guest.Memory.Read(new GuestPhysAddr(StoreAddress), b);
        Assert.Equal(0x7E, b[0]);
    }

    [KvmFact]
    public void Kick_makes_a_spinning_vcpu_leave_the_guest()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        guest.Load(Spin());
        using var started = new ManualResetEventSlim();
        VmExit? exit = null;
        Exception? error = null;
        var vcpuThread = new Thread(() =>
        {
            try
            {
                guest.Vcpu.BindToCurrentThread();
                started.Set();
                exit = guest.Vcpu.Run();
            }
            catch (Exception e)
            {
                error = e;
            }
        }) { IsBackground = true, Name = "vcpu 0" };
        vcpuThread.Start();
        started.Wait();

        guest.Vcpu.Kick();

        // A liveness bound, not a timing assertion: without the kick the guest spins forever.
        Assert.True(vcpuThread.Join(TimeSpan.FromSeconds(30)), "the kicked vcpu did not leave KVM_RUN");
        Assert.Null(error);
        Assert.IsType<VmExit.Intr>(exit);
        Assert.False(guest.Vcpu.RunPage.ImmediateExit); // cleared, so the next Run enters the guest
        Assert.Equal(CodeAddress, guest.Vcpu.GetRegisters().Rip); // still on the jmp
    }

    [KvmFact]
    public void A_kick_between_runs_is_kept_for_a_plain_run_and_left_to_the_caller_after_PrepareToRun()
    {
        KvmRequirement.Check();
        using var guest = new RealModeGuest();
        guest.Load(OutThenHlt());
        guest.Vcpu.BindToCurrentThread(); // this thread is the vcpu's; kicks come from another
        void KickFromAnotherThread()
        {
            var kicker = new Thread(() => guest.Vcpu.Kick());
            kicker.Start();
            kicker.Join();
        }

        // Out of KVM_RUN: the kick leaves immediate_exit set, so a plain Run leaves at once.
        KickFromAnotherThread();
        Assert.True(guest.Vcpu.RunPage.ImmediateExit);
        Assert.IsType<VmExit.Intr>(guest.Vcpu.Run());

        // A caller that announces its entry, then looks for the kicker's work, owns the kick: the
        // entry after PrepareToRun goes into the guest.
        KickFromAnotherThread();
        guest.Vcpu.PrepareToRun();
        Assert.False(guest.Vcpu.RunPage.ImmediateExit);
        Assert.Equal(new VmExit.Io(true, OutPort, 1, 1, 0x41, null), guest.Vcpu.Run());

        // A kick after the announcement reaches the entry.
        guest.Vcpu.PrepareToRun();
        KickFromAnotherThread();
        Assert.IsType<VmExit.Intr>(guest.Vcpu.Run());
        Assert.IsType<VmExit.Hlt>(guest.Vcpu.Run());
    }

    /// <summary>One VM with 64 KiB of RAM at GPA 0 and one vcpu in real mode, CS:IP = 0:0x1000.</summary>
    private sealed class RealModeGuest : IDisposable
    {
        public Kvm Kvm { get; }
        public VmHandle Vm { get; }
        public GuestMemoryMap Memory { get; } = new();
        public CpuidPolicy Policy { get; }
        public VcpuHandle Vcpu { get; }

        public RealModeGuest(int vcpuId = 0)
        {
            Kvm = Kvm.Open();
            Vm = Kvm.CreateVm();
            Memory.Add("ram", new GuestPhysAddr(0), RamSize, new MemfdRegion("test-ram", RamSize));
            Memory.RegisterWith(Vm);
            Policy = CpuidPolicy.ForPlatform(Kvm.GetSupportedCpuid());
            Vcpu = Vm.CreateVcpu(vcpuId, Policy);

            var sregs = Vcpu.GetSpecialRegisters();
            sregs.Cs.Selector = 0;
            sregs.Cs.Base = 0;
            Vcpu.SetSpecialRegisters(sregs);
        }

        public void Load(ReadOnlySpan<byte> code)
        {
            Memory.Write(new GuestPhysAddr(CodeAddress), code);
            var regs = Vcpu.GetRegisters();
            regs.Rip = CodeAddress;
            regs.Rflags = RflagsReserved;
            Vcpu.SetRegisters(regs);
        }

        /// <summary>Runs to the next exit; a stray signal (Intr) just re-enters, as a vcpu loop would.</summary>
        public VmExit NextExit()
        {
            for (var i = 0; i < 100; i++)
            {
                var exit = Vcpu.Run();
                if (exit is not VmExit.Intr) return exit;
            }
            throw new InvalidOperationException("KVM_RUN returned EINTR 100 times in a row");
        }

        public void Dispose()
        {
            Vcpu.Dispose();
            Vm.Dispose();
            Memory.Dispose();
            Kvm.Dispose();
        }
    }
}
