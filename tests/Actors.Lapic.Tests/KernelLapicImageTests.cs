using System.Buffers.Binary;
using static ActorVmm.Lapic.ApicOffsets;

namespace ActorVmm.Lapic.Tests;

/// <summary>
/// The in-kernel APIC's 1 KiB register image (KVM_GET/SET_LAPIC) and the Apic Page of a snapshot:
/// KVM keeps the APIC ID in bits 31:24 in both modes (no KVM_X2APIC_API_USE_32BIT_IDS; checked
/// against real KVM in LibVmm.Tests' SplitIrqchipTests), the page as the guest reads it.
/// </summary>
public sealed class KernelLapicImageTests
{
    private const int ImageSize = 1024;
    private const ulong XApic = LocalApic.DefaultBaseAddress | LocalApic.BaseEnable;
    private const ulong X2Apic = XApic | LocalApic.BaseExtd;

    private static byte[] Image(uint idRegister, uint ldr)
    {
        var image = new byte[ImageSize];
        BinaryPrimitives.WriteUInt32LittleEndian(image.AsSpan(Id), idRegister);
        BinaryPrimitives.WriteUInt32LittleEndian(image.AsSpan(Ldr), ldr);
        BinaryPrimitives.WriteUInt32LittleEndian(image.AsSpan(Svr), 0x1FF);
        return image;
    }

    private static uint PageReg(LapicState state, int offset) => BinaryPrimitives.ReadUInt32LittleEndian(state.ApicPage.AsSpan()[offset..]);

    [Fact]
    public void An_x2apic_snapshot_holds_the_32_bit_id_the_guest_reads_and_goes_back_to_kvm_in_bits_31_to_24()
    {
        var kernel = Image(5u << 24, LocalApic.X2ApicLdr(5));

        var state = KvmAssistedLapicBackend.StateFromKernel(kernel, X2Apic, 0);

        Assert.Equal(5u, state.ApicId);
        Assert.Equal(5u, PageReg(state, Id)); // RDMSR 0x802 in x2APIC mode (SDM §10.12.5.1)
        Assert.Contains("X2Apic, id 5,", LapicDump.Format(5, state));
        Assert.Equal(kernel, KvmAssistedLapicBackend.KernelImage(state, ImageSize));
    }

    [Fact]
    public void An_xapic_snapshot_keeps_the_id_in_bits_31_to_24_both_ways()
    {
        var kernel = Image(3u << 24, 0);

        var state = KvmAssistedLapicBackend.StateFromKernel(kernel, XApic, 0);

        Assert.Equal(3u, state.ApicId);
        Assert.Equal(3u << 24, PageReg(state, Id));
        Assert.Equal(kernel, KvmAssistedLapicBackend.KernelImage(state, ImageSize));
    }

    [Fact]
    public void An_emulated_x2apic_snapshot_goes_to_kvm_with_the_id_in_bits_31_to_24()
    {
        var rig = new Rig(id: 2, bsp: false);
        rig.EnterX2Apic();
        var state = rig.Apic.State();
        Assert.Equal(2u, PageReg(state, Id)); // the model's page, as the guest reads it

        var image = KvmAssistedLapicBackend.KernelImage(state, ImageSize);

        Assert.Equal(2u << 24, BinaryPrimitives.ReadUInt32LittleEndian(image.AsSpan(Id)));
        Assert.Equal(LocalApic.X2ApicLdr(2), BinaryPrimitives.ReadUInt32LittleEndian(image.AsSpan(Ldr)));
    }
}
