using ActorVmm.Testing;

namespace ActorVmm.LibVmm.Tests;

/// <summary>KVM's split irqchip as LibVmm drives it for lapic = assisted: local APICs in the kernel,
/// reached with KVM_SIGNAL_MSI, read and written as 1 KiB register images, with KVM's MP state.</summary>
public sealed class SplitIrqchipTests
{
    private const int Svr = 0xF0, Irr = 0x200, Id = 0x20, Version = 0x30;

    private static uint Reg(byte[] image, int offset) => BitConverter.ToUInt32(image, offset);

    /// <summary>A VM with the split irqchip (24 IOAPIC routes), before any vcpu exists.</summary>
    private static VmHandle SplitVm(Kvm kvm)
    {
        var vm = kvm.CreateVm();
        try
        {
            vm.EnableSplitIrqchip(24);
            return vm;
        }
        catch
        {
            vm.Dispose();
            throw;
        }
    }

    [KvmFact]
    public void An_msi_sets_the_vector_in_the_irr_of_the_addressed_kernel_apic_only()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        using var vm = SplitVm(kvm);
        Assert.True(vm.SplitIrqchip);
        var cpuid = CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid());
        using var bsp = vm.CreateVcpu(0, cpuid);
        using var ap = vm.CreateVcpu(1, cpuid);

        // KVM keeps the MP state now: the BSP runs, the AP waits for INIT-SIPI.
        Assert.Equal(KvmMpState.Runnable, bsp.GetMpState());
        Assert.Equal(KvmMpState.Uninitialized, ap.GetMpState());

        var image = ap.GetLapic();
        Assert.Equal(VcpuHandle.LapicStateSize, image.Length);
        Assert.Equal(1u, Reg(image, Id) >> 24);
        Assert.Equal(0x14u, Reg(image, Version) & 0xFF); // an integrated APIC

        // A software-disabled APIC takes no fixed interrupt: enable vcpu 1's through its image.
        BitConverter.GetBytes(0x1FFu).CopyTo(image, Svr);
        ap.SetLapic(image);
        Assert.Equal(0x1FFu, Reg(ap.GetLapic(), Svr));

        const byte vector = 0x45;
        var delivered = vm.SignalMsi(0xFEE0_0000UL | (1UL << 12), vector);
        Assert.True(delivered);
        var irr = ap.GetLapic();
        Assert.NotEqual(0u, Reg(irr, Irr + 0x10 * (vector / 32)) & (1u << (vector % 32)));
        Assert.Equal(0u, Reg(bsp.GetLapic(), Irr + 0x10 * (vector / 32)) & (1u << (vector % 32)));

        // To an APIC ID nobody has: taken by none.
        Assert.False(vm.SignalMsi(0xFEE0_0000UL | (9UL << 12), vector));
    }

    [KvmFact]
    public void Msi_routes_for_the_ioapic_pins_are_accepted_and_other_kinds_of_input_refused()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        using var vm = SplitVm(kvm);
        var cpuid = CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid());
        using var bsp = vm.CreateVcpu(0, cpuid);

        vm.SetMsiRoutes([new VmHandle.MsiRoute(0, 0xFEE0_0000, 0x8030), new VmHandle.MsiRoute(4, 0xFEE0_0000, 0xC031)]);
        vm.SetMsiRoutes([]);
        // A vcpu already exists: the split irqchip can no longer be enabled.
        using var late = kvm.CreateVm();
        using var vcpu = late.CreateVcpu(0, cpuid);
        var e = Assert.Throws<KvmException>(() => late.EnableSplitIrqchip(24));
        Assert.Contains("SPLIT", e.Message.ToUpperInvariant());
    }

    /// <summary>What the snapshot code relies on (KvmAssistedLapicBackend.StateFromKernel): without
    /// KVM_X2APIC_API_USE_32BIT_IDS, KVM's register image keeps the APIC ID in bits 31:24 in x2APIC
    /// mode too, where the guest reads the 32-bit x2APIC ID (RDMSR 0x802 = 1 for vcpu 1).</summary>
    [KvmFact]
    public void In_x2apic_mode_the_kernel_image_still_holds_the_apic_id_in_bits_31_to_24()
    {
        KvmRequirement.Check();
        using var kvm = Kvm.Open();
        using var vm = SplitVm(kvm);
        var cpuid = CpuidPolicy.ForPlatform(kvm.GetSupportedCpuid());
        using var bsp = vm.CreateVcpu(0, cpuid);
        using var ap = vm.CreateVcpu(1, cpuid);
        const uint apicBaseMsr = 0x1B;
        const ulong enable = 1UL << 11, extd = 1UL << 10;

        ap.SetMsrs(new KvmMsrEntry { Index = apicBaseMsr, Data = 0xFEE0_0000UL | enable | extd });

        Assert.Equal(0xFEE0_0000UL | enable | extd, ap.GetMsrs(apicBaseMsr)[0].Data);
        Assert.Equal(1u << 24, Reg(ap.GetLapic(), Id));
        Assert.Equal(0x2u, Reg(ap.GetLapic(), 0xD0)); // LDR: cluster 0, bit 1 (SDM §10.12.10.2), from the 32-bit ID 1
    }
}
